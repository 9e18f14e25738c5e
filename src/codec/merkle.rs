//! BLAKE3 Merkle tree over a file's shard leaves, with inclusion proofs.
//!
//! The tree shape follows RFC 6962 (Certificate Transparency): for n leaves the left subtree holds the largest
//! power of two smaller than n. Leaf and interior hashes are domain separated (prefix 0 and 1) so a leaf can
//! never be passed off as an interior node. A leaf commits to the shard's position (file id, segment, shard
//! index), its length and the BLAKE3 of its bytes, so a shard written to the wrong place fails verification.

/// A 32-byte BLAKE3 digest.
pub type Hash = [u8; 32];

/// Hash of one shard as a leaf of its file's tree.
pub fn leaf_hash(file_id: &[u8; 16], segment: u64, shard: u16, len: u32, payload_hash: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[0u8]);
    h.update(file_id);
    h.update(&segment.to_le_bytes());
    h.update(&shard.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload_hash);
    *h.finalize().as_bytes()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[1u8]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

fn split_point(n: usize) -> usize {
    // Largest power of two strictly smaller than n (n >= 2).
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Root of the tree over `leaves`; the root of no leaves is the hash of the empty string.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => *blake3::hash(b"").as_bytes(),
        1 => leaves[0],
        n => {
            let k = split_point(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// Proof that one leaf is part of a tree with a given root.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Proof {
    /// Index of the leaf.
    pub index: u64,
    /// Number of leaves in the tree.
    pub leaf_count: u64,
    /// Sibling hashes from the leaf upwards.
    pub siblings: Vec<Hash>,
}

/// Builds the inclusion proof of leaf `index`; `None` when out of range.
pub fn proof(leaves: &[Hash], index: usize) -> Option<Proof> {
    if index >= leaves.len() {
        return None;
    }
    let mut siblings = Vec::new();
    collect_path(leaves, index, &mut siblings);
    Some(Proof { index: index as u64, leaf_count: leaves.len() as u64, siblings })
}

fn collect_path(leaves: &[Hash], index: usize, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split_point(n);
    if index < k {
        collect_path(&leaves[..k], index, out);
        out.push(root(&leaves[k..]));
    } else {
        collect_path(&leaves[k..], index - k, out);
        out.push(root(&leaves[..k]));
    }
}

/// Checks that `leaf` sits at `proof.index` of a tree with root `expected_root`.
pub fn verify(expected_root: &Hash, leaf: &Hash, proof: &Proof) -> bool {
    if proof.index >= proof.leaf_count {
        return false;
    }
    // Recompute the path top-down: record at each level whether the leaf goes left, then fold bottom-up.
    let (mut index, mut n) = (proof.index, proof.leaf_count);
    let mut goes_left = Vec::new();
    while n > 1 {
        let k = split_point(n as usize) as u64;
        if index < k {
            goes_left.push(true);
            n = k;
        } else {
            goes_left.push(false);
            index -= k;
            n -= k;
        }
    }
    if goes_left.len() != proof.siblings.len() {
        return false;
    }
    let mut acc = *leaf;
    for (left, sib) in goes_left.iter().rev().zip(&proof.siblings) {
        acc = if *left { node_hash(&acc, sib) } else { node_hash(sib, &acc) };
    }
    acc == *expected_root
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes()).collect()
    }

    #[test]
    fn every_leaf_of_every_small_tree_proves() {
        for n in 1..40 {
            let l = leaves(n);
            let r = root(&l);
            for (i, leaf) in l.iter().enumerate() {
                let p = proof(&l, i).unwrap();
                assert!(verify(&r, leaf, &p), "n={n} i={i}");
                // The proof does not transfer to another leaf.
                if n > 1 {
                    assert!(!verify(&r, &l[(i + 1) % n], &p));
                }
            }
            assert!(proof(&l, n).is_none());
        }
    }

    #[test]
    fn root_depends_on_order() {
        let mut l = leaves(5);
        let r = root(&l);
        l.swap(1, 2);
        assert_ne!(root(&l), r);
    }

    proptest! {
        #[test]
        fn any_flipped_bit_fails(n in 1usize..64, i in any::<usize>(), bit in any::<usize>()) {
            let l = leaves(n);
            let i = i % n;
            let r = root(&l);
            let p = proof(&l, i).unwrap();
            prop_assert!(verify(&r, &l[i], &p));
            // Flip one bit in the leaf, the root, or a sibling.
            let total = 256 * (2 + p.siblings.len());
            let b = bit % total;
            let (mut leaf, mut root_, mut p2) = (l[i], r, p.clone());
            match b / 256 {
                0 => leaf[(b % 256) / 8] ^= 1 << (b % 8),
                1 => root_[(b % 256) / 8] ^= 1 << (b % 8),
                s => p2.siblings[s - 2][(b % 256) / 8] ^= 1 << (b % 8),
            }
            prop_assert!(!verify(&root_, &leaf, &p2));
        }
    }
}
