//! The inode table and directory tree of a mount, derived from committed file names.
//!
//! Names in the store are `/`-separated relative paths; directories are implied by them. A directory made by
//! `mkdir`, one with a catalog entry of its own, or one whose last file was removed through the mount, is
//! *explicit*: it stays even when empty (the view records its entry in the catalog). Inode numbers are never
//! reused within a mount, and a rename moves a node (keeping its inode), so the kernel's view stays consistent.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, FsErrorKind, Result};

/// Inode number.
pub type Ino = u64;

/// Inode of the root directory.
pub const ROOT: Ino = 1;

/// What a node is.
#[derive(Debug)]
pub enum NodeKind<F> {
    /// A directory: children by name, and whether it persists when empty.
    Dir {
        /// Children by name.
        children: BTreeMap<String, Ino>,
        /// Made by mkdir or emptied through the mount: kept while mounted even when empty.
        explicit: bool,
    },
    /// A file with the caller's payload.
    File(F),
}

/// One node of the tree.
#[derive(Debug)]
pub struct Node<F> {
    /// Parent directory (the root is its own parent).
    pub parent: Ino,
    /// Name within the parent (empty for the root).
    pub name: String,
    /// Directory or file.
    pub kind: NodeKind<F>,
}

impl<F> Node<F> {
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// The tree: nodes by inode.
#[derive(Debug)]
pub struct Tree<F> {
    nodes: HashMap<Ino, Node<F>>,
    next: Ino,
}

fn err(kind: FsErrorKind, path: &str) -> Error {
    Error::fs(kind, path)
}

impl<F> Default for Tree<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F> Tree<F> {
    /// A tree with only the root directory.
    pub fn new() -> Self {
        let root = Node {
            parent: ROOT,
            name: String::new(),
            kind: NodeKind::Dir { children: BTreeMap::new(), explicit: true },
        };
        Tree { nodes: HashMap::from([(ROOT, root)]), next: ROOT + 1 }
    }

    /// True for an inode number this tree gave and has removed since (numbers are never reused).
    pub fn was_removed(&self, ino: Ino) -> bool {
        ino < self.next && !self.nodes.contains_key(&ino)
    }

    /// Number of nodes (the root included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never true: the root always exists.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The node of `ino`.
    pub fn get(&self, ino: Ino) -> Option<&Node<F>> {
        self.nodes.get(&ino)
    }

    /// The file payload of `ino`, when it is a file.
    pub fn file(&self, ino: Ino) -> Option<&F> {
        match &self.nodes.get(&ino)?.kind {
            NodeKind::File(f) => Some(f),
            NodeKind::Dir { .. } => None,
        }
    }

    /// The file payload of `ino`, mutable.
    pub fn file_mut(&mut self, ino: Ino) -> Option<&mut F> {
        match &mut self.nodes.get_mut(&ino)?.kind {
            NodeKind::File(f) => Some(f),
            NodeKind::Dir { .. } => None,
        }
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &str) -> Option<Ino> {
        match &self.nodes.get(&parent)?.kind {
            NodeKind::Dir { children, .. } => children.get(name).copied(),
            NodeKind::File(_) => None,
        }
    }

    /// Children of a directory, in name order.
    pub fn children(&self, dir: Ino) -> Option<impl Iterator<Item = (&str, Ino)>> {
        match &self.nodes.get(&dir)?.kind {
            NodeKind::Dir { children, .. } => Some(children.iter().map(|(n, i)| (n.as_str(), *i))),
            NodeKind::File(_) => None,
        }
    }

    /// The store name of `ino` (`a/b/c`; empty for the root). The walk is bounded by the node count, so a
    /// corrupted parent chain cannot loop.
    pub fn path(&self, ino: Ino) -> Option<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..self.nodes.len() {
            if cur == ROOT {
                parts.reverse();
                return Some(parts.join("/"));
            }
            let n = self.nodes.get(&cur)?;
            parts.push(n.name.as_str());
            cur = n.parent;
        }
        None
    }

    /// The path of child `name` of `parent`.
    pub fn child_path(&self, parent: Ino, name: &str) -> Option<String> {
        let p = self.path(parent)?;
        Some(if p.is_empty() { name.to_string() } else { format!("{p}/{name}") })
    }

    /// The inode at `path`.
    pub fn resolve(&self, path: &str) -> Option<Ino> {
        if path.is_empty() {
            return Some(ROOT);
        }
        path.split('/').try_fold(ROOT, |dir, part| self.lookup(dir, part))
    }

    /// True when `ino` is `ancestor` or lies below it.
    pub fn is_within(&self, ino: Ino, ancestor: Ino) -> bool {
        let mut cur = ino;
        for _ in 0..self.nodes.len() {
            if cur == ancestor {
                return true;
            }
            if cur == ROOT {
                return false;
            }
            match self.nodes.get(&cur) {
                Some(n) => cur = n.parent,
                None => return false,
            }
        }
        false
    }

    fn attach(&mut self, parent: Ino, name: &str, kind: NodeKind<F>) -> Ino {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, Node { parent, name: name.to_string(), kind });
        if let Some(NodeKind::Dir { children, .. }) = self.nodes.get_mut(&parent).map(|n| &mut n.kind) {
            children.insert(name.to_string(), ino);
        }
        ino
    }

    /// Makes directory `name` in `parent`, explicit (kept while mounted).
    pub fn mkdir(&mut self, parent: Ino, name: &str) -> Result<Ino> {
        let path = self.child_path(parent, name).unwrap_or_else(|| name.to_string());
        match self.nodes.get(&parent).map(|n| &n.kind) {
            Some(NodeKind::Dir { children, .. }) if children.contains_key(name) => {
                Err(err(FsErrorKind::AlreadyExists, &path))
            }
            Some(NodeKind::Dir { .. }) => {
                Ok(self.attach(parent, name, NodeKind::Dir { children: BTreeMap::new(), explicit: true }))
            }
            Some(NodeKind::File(_)) => Err(err(FsErrorKind::NotADirectory, &path)),
            None => Err(err(FsErrorKind::NotFound, &path)),
        }
    }

    /// Adds file `name` in directory `parent`; fails when the name exists.
    pub fn create(&mut self, parent: Ino, name: &str, data: F) -> Result<Ino> {
        let path = self.child_path(parent, name).unwrap_or_else(|| name.to_string());
        match self.nodes.get(&parent).map(|n| &n.kind) {
            Some(NodeKind::Dir { children, .. }) if children.contains_key(name) => {
                Err(err(FsErrorKind::AlreadyExists, &path))
            }
            Some(NodeKind::Dir { .. }) => Ok(self.attach(parent, name, NodeKind::File(data))),
            Some(NodeKind::File(_)) => Err(err(FsErrorKind::NotADirectory, &path)),
            None => Err(err(FsErrorKind::NotFound, &path)),
        }
    }

    /// Gives file `ino` a new inode number in the same place, with payload `data`; returns the new number.
    pub fn renumber(&mut self, ino: Ino, data: F) -> Result<Ino> {
        let path = self.path(ino).unwrap_or_default();
        match self.nodes.get(&ino).map(|n| &n.kind) {
            Some(NodeKind::File(_)) => {}
            Some(NodeKind::Dir { .. }) => return Err(err(FsErrorKind::IsADirectory, &path)),
            None => return Err(err(FsErrorKind::NotFound, &path)),
        }
        let node = self.detach(ino).ok_or_else(|| err(FsErrorKind::NotFound, &path))?;
        Ok(self.attach(node.parent, &node.name, NodeKind::File(data)))
    }

    /// Adds the file at `path`, creating the directories it implies (not explicit). When a file is already
    /// there, its payload is replaced and its inode kept. Fails when a component is a file or the path is a
    /// directory (a store may hold both `a` and `a/b`: the first one seen wins).
    pub fn insert_file(&mut self, path: &str, data: F) -> Result<Ino> {
        let mut parts: Vec<&str> = path.split('/').collect();
        let Some(leaf) = parts.pop() else {
            return Err(err(FsErrorKind::InvalidArgument, path));
        };
        let mut dir = ROOT;
        for part in parts {
            dir = match self.lookup(dir, part) {
                Some(i) if self.nodes.get(&i).is_some_and(|n| n.is_dir()) => i,
                Some(_) => return Err(err(FsErrorKind::NotADirectory, path)),
                None => self.attach(dir, part, NodeKind::Dir { children: BTreeMap::new(), explicit: false }),
            };
        }
        match self.lookup(dir, leaf) {
            Some(i) => match self.nodes.get_mut(&i).map(|n| &mut n.kind) {
                Some(NodeKind::File(f)) => {
                    *f = data;
                    Ok(i)
                }
                _ => Err(err(FsErrorKind::IsADirectory, path)),
            },
            None => Ok(self.attach(dir, leaf, NodeKind::File(data))),
        }
    }

    /// The directory at `path`, made (explicit, with the directories above it) when missing. Fails when a
    /// component is a file.
    pub fn ensure_dir(&mut self, path: &str) -> Result<Ino> {
        let mut dir = ROOT;
        for part in path.split('/') {
            dir = match self.lookup(dir, part) {
                Some(i) if self.nodes.get(&i).is_some_and(|n| n.is_dir()) => i,
                Some(_) => return Err(err(FsErrorKind::NotADirectory, path)),
                None => self.attach(dir, part, NodeKind::Dir { children: BTreeMap::new(), explicit: false }),
            };
        }
        if let Some(NodeKind::Dir { explicit, .. }) = self.nodes.get_mut(&dir).map(|n| &mut n.kind) {
            *explicit = true;
        }
        Ok(dir)
    }

    /// Marks directory `ino` explicit (kept when empty).
    pub fn set_explicit(&mut self, ino: Ino) {
        if let Some(NodeKind::Dir { explicit, .. }) = self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            *explicit = true;
        }
    }

    /// Removes a file or an empty directory; returns the node. `keep_parent` makes the parent explicit, so a
    /// directory emptied through the mount stays (as it would on a disk filesystem); otherwise implied parent
    /// directories left empty vanish too.
    pub fn remove(&mut self, ino: Ino, keep_parent: bool) -> Result<Node<F>> {
        let path = self.path(ino).unwrap_or_default();
        if ino == ROOT {
            return Err(err(FsErrorKind::InvalidArgument, &path));
        }
        match self.nodes.get(&ino).map(|n| &n.kind) {
            None => return Err(err(FsErrorKind::NotFound, &path)),
            Some(NodeKind::Dir { children, .. }) if !children.is_empty() => {
                return Err(err(FsErrorKind::DirectoryNotEmpty, &path))
            }
            Some(_) => {}
        }
        let node = self.detach(ino).ok_or_else(|| err(FsErrorKind::NotFound, &path))?;
        if keep_parent {
            if let Some(NodeKind::Dir { explicit, .. }) = self.nodes.get_mut(&node.parent).map(|n| &mut n.kind) {
                *explicit = true;
            }
        } else {
            self.prune(node.parent);
        }
        Ok(node)
    }

    fn detach(&mut self, ino: Ino) -> Option<Node<F>> {
        let node = self.nodes.remove(&ino)?;
        if let Some(NodeKind::Dir { children, .. }) = self.nodes.get_mut(&node.parent).map(|n| &mut n.kind) {
            children.remove(&node.name);
        }
        Some(node)
    }

    /// Removes implied (non-explicit) empty directories from `dir` upwards.
    pub fn prune(&mut self, mut dir: Ino) {
        while dir != ROOT {
            let parent = match self.nodes.get(&dir) {
                Some(Node { parent, kind: NodeKind::Dir { children, explicit: false }, .. }) if children.is_empty() => {
                    *parent
                }
                _ => return,
            };
            self.detach(dir);
            dir = parent;
        }
    }

    /// Moves `ino` to `name` in `new_parent`, replacing a file there (or an empty directory when `ino` is a
    /// directory) like rename(2). Returns the replaced node. The old parent becomes explicit.
    pub fn rename(&mut self, ino: Ino, new_parent: Ino, name: &str) -> Result<Option<Node<F>>> {
        let existing = self.check_rename(ino, new_parent, name)?;
        if existing == Some(ino) {
            return Ok(None);
        }
        let replaced = existing.and_then(|e| self.detach(e));
        let Some(old_parent) = self.nodes.get(&ino).map(|n| n.parent) else {
            return Ok(replaced);
        };
        if let Some(NodeKind::Dir { children, explicit }) = self.nodes.get_mut(&old_parent).map(|n| &mut n.kind) {
            if let Some(old_name) = children.iter().find(|(_, i)| **i == ino).map(|(n, _)| n.clone()) {
                children.remove(&old_name);
            }
            *explicit = true;
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.parent = new_parent;
            n.name = name.to_string();
        }
        if let Some(NodeKind::Dir { children, .. }) = self.nodes.get_mut(&new_parent).map(|n| &mut n.kind) {
            children.insert(name.to_string(), ino);
        }
        Ok(replaced)
    }

    /// Checks that [`Tree::rename`] would succeed, without changing anything; returns the node it would replace.
    pub fn check_rename(&self, ino: Ino, new_parent: Ino, name: &str) -> Result<Option<Ino>> {
        let target_path = self.child_path(new_parent, name).unwrap_or_else(|| name.to_string());
        let src_is_dir = match self.nodes.get(&ino) {
            Some(n) if ino != ROOT => n.is_dir(),
            _ => return Err(err(FsErrorKind::NotFound, &target_path)),
        };
        match self.nodes.get(&new_parent) {
            Some(n) if n.is_dir() => {}
            Some(_) => return Err(err(FsErrorKind::NotADirectory, &target_path)),
            None => return Err(err(FsErrorKind::NotFound, &target_path)),
        }
        if src_is_dir && self.is_within(new_parent, ino) {
            return Err(err(FsErrorKind::InvalidArgument, &target_path));
        }
        let Some(existing) = self.lookup(new_parent, name) else {
            return Ok(None);
        };
        if existing != ino {
            match (&self.nodes.get(&existing).map(|n| &n.kind), src_is_dir) {
                (Some(NodeKind::Dir { children, .. }), true) if !children.is_empty() => {
                    return Err(err(FsErrorKind::DirectoryNotEmpty, &target_path))
                }
                (Some(NodeKind::Dir { .. }), false) => return Err(err(FsErrorKind::IsADirectory, &target_path)),
                (Some(NodeKind::File(_)), true) => return Err(err(FsErrorKind::NotADirectory, &target_path)),
                _ => {}
            }
        }
        Ok(Some(existing))
    }

    /// Every file below `dir` (inclusive when `dir` is a file), with its path.
    pub fn files_below(&self, dir: Ino) -> Vec<(Ino, String)> {
        let mut out = self.nodes_below(dir);
        out.retain(|(i, _)| self.file(*i).is_some());
        out
    }

    /// Every node at or below `ino`, directories included, with its path.
    pub fn nodes_below(&self, ino: Ino) -> Vec<(Ino, String)> {
        let mut out = Vec::new();
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            if let Some(NodeKind::Dir { children, .. }) = self.nodes.get(&i).map(|n| &n.kind) {
                stack.extend(children.values().copied());
            }
            if let Some(p) = self.path(i) {
                out.push((i, p));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: &Tree<u32>, dir: Ino) -> Vec<String> {
        t.children(dir).unwrap().map(|(n, _)| n.to_string()).collect()
    }

    #[test]
    fn directories_are_derived_from_paths() {
        let mut t = Tree::new();
        let f = t.insert_file("a/b/c.txt", 1).unwrap();
        t.insert_file("a/d", 2).unwrap();
        t.insert_file("top", 3).unwrap();
        assert_eq!(names(&t, ROOT), ["a", "top"]);
        let a = t.resolve("a").unwrap();
        assert_eq!(names(&t, a), ["b", "d"]);
        assert_eq!(t.path(f).unwrap(), "a/b/c.txt");
        assert_eq!(t.file(f), Some(&1));
        // Same path again: payload replaced, inode kept.
        assert_eq!(t.insert_file("a/b/c.txt", 9).unwrap(), f);
        assert_eq!(t.file(f), Some(&9));
        // File/directory conflicts are refused.
        assert_eq!(t.insert_file("a/b", 4).unwrap_err().fs_kind(), FsErrorKind::IsADirectory);
        assert_eq!(t.insert_file("top/x", 4).unwrap_err().fs_kind(), FsErrorKind::NotADirectory);
    }

    #[test]
    fn removal_prunes_implied_dirs_unless_kept() {
        let mut t = Tree::new();
        let f = t.insert_file("x/y/z", 1).unwrap();
        t.remove(f, false).unwrap();
        assert!(t.resolve("x").is_none(), "implied directories vanish with their last file");
        let f = t.insert_file("x/y/z", 1).unwrap();
        t.remove(f, true).unwrap();
        let y = t.resolve("x/y").expect("emptied through the mount: kept");
        assert_eq!(t.remove(t.resolve("x").unwrap(), true).unwrap_err().fs_kind(), FsErrorKind::DirectoryNotEmpty);
        t.remove(y, true).unwrap();
        t.remove(t.resolve("x").unwrap(), true).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(ROOT, true).unwrap_err().fs_kind(), FsErrorKind::InvalidArgument);
    }

    #[test]
    fn mkdir_and_create() {
        let mut t = Tree::new();
        let d = t.mkdir(ROOT, "d").unwrap();
        assert_eq!(t.mkdir(ROOT, "d").unwrap_err().fs_kind(), FsErrorKind::AlreadyExists);
        let f = t.create(d, "f", 5).unwrap();
        assert_eq!(t.create(d, "f", 5).unwrap_err().fs_kind(), FsErrorKind::AlreadyExists);
        assert_eq!(t.mkdir(f, "g").unwrap_err().fs_kind(), FsErrorKind::NotADirectory);
        assert_eq!(t.lookup(d, "f"), Some(f));
        t.prune(d);
        assert!(t.resolve("d").is_some(), "explicit directories are not pruned");
    }

    #[test]
    fn rename_keeps_inodes_and_follows_rename2_rules() {
        let mut t = Tree::new();
        let f = t.insert_file("a/f", 1).unwrap();
        let g = t.insert_file("b/g", 2).unwrap();
        let b = t.resolve("b").unwrap();
        // File over file: the target is replaced.
        let replaced = t.rename(f, b, "g").unwrap().unwrap();
        assert!(matches!(replaced.kind, NodeKind::File(2)));
        assert_eq!(t.resolve("b/g"), Some(f));
        assert!(t.get(g).is_none());
        assert!(t.resolve("a").is_some(), "the old parent stays, now empty");
        // Directory into itself, directory over file, file over directory.
        let a = t.resolve("a").unwrap();
        let sub = t.mkdir(a, "sub").unwrap();
        assert_eq!(t.rename(a, sub, "x").unwrap_err().fs_kind(), FsErrorKind::InvalidArgument);
        assert_eq!(t.rename(a, b, "g").unwrap_err().fs_kind(), FsErrorKind::NotADirectory);
        assert_eq!(t.rename(f, ROOT, "a").unwrap_err().fs_kind(), FsErrorKind::IsADirectory);
        // Directory over a non-empty directory.
        assert_eq!(t.rename(b, ROOT, "a").unwrap_err().fs_kind(), FsErrorKind::DirectoryNotEmpty);
        // Directory move carries its subtree.
        t.rename(a, b, "moved").unwrap();
        assert_eq!(t.path(sub).unwrap(), "b/moved/sub");
        let files: Vec<String> = t.files_below(ROOT).into_iter().map(|(_, p)| p).collect();
        assert_eq!(files, ["b/g"]);
        let mut all: Vec<String> = t.nodes_below(b).into_iter().map(|(_, p)| p).collect();
        all.sort();
        assert_eq!(all, ["b", "b/g", "b/moved", "b/moved/sub"]);
    }

    #[test]
    fn ensure_dir_makes_explicit_directories() {
        let mut t: Tree<u32> = Tree::new();
        t.insert_file("a/f", 1).unwrap();
        let a = t.ensure_dir("a").unwrap();
        assert_eq!(t.resolve("a"), Some(a));
        let c = t.ensure_dir("a/b/c").unwrap();
        assert_eq!(t.path(c).unwrap(), "a/b/c");
        t.remove(t.resolve("a/f").unwrap(), false).unwrap();
        assert!(t.resolve("a").is_some(), "a directory with an entry of its own is not pruned");
        assert!(t.ensure_dir("a/f2/x").is_ok());
        t.insert_file("a/file", 2).unwrap();
        assert_eq!(t.ensure_dir("a/file/x").unwrap_err().fs_kind(), FsErrorKind::NotADirectory);
    }
}
