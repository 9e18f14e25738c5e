//! Failure domains ("zones": a machine, rack or site several locations share) and how many of them a store's
//! layout survives losing. Pure logic over the descriptor's locations and zones and the placement rule.
//!
//! A location without a zone is a domain of its own. Shard `i` of stripe `s` lives on location
//! [`crate::store::placement`]`(start, s, i, n)`, so the locations a stripe uses are always k+m consecutive ones
//! (mod n) of the descriptor's list: the layout survives losing a set of zones when no such window has more than
//! m shards in them.

use std::collections::BTreeMap;

/// How a store's locations fall into zones, and what losing zones costs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ZoneTolerance {
    /// Distinct failure domains (named zones plus locations without one).
    pub domains: usize,
    /// True when some location has a named zone.
    pub named: bool,
    /// How many domains may be lost, whichever they are, with every stripe still readable.
    pub tolerance: usize,
    /// Most shards of one stripe in a single domain (the worst window of the placement).
    pub most_in_one: usize,
}

/// The domain of each location: its zone, or a name of its own when it has none.
pub fn domains(zones: &[String]) -> Vec<String> {
    zones.iter().enumerate().map(|(i, z)| if z.is_empty() { format!("#location-{i}") } else { z.clone() }).collect()
}

/// An order of the locations (indices into `zones`) in which consecutive ones are in different domains as far
/// as possible, so that each stripe's k+m consecutive locations span as many zones as they can: each next one
/// is taken from the domain with the most locations left, other than the previous one's (ties: the domain seen
/// first). Locations without a zone are domains of one. Without zones it is the identity.
pub fn spread_order(zones: &[String]) -> Vec<usize> {
    let of = domains(zones);
    // Domains in order of first appearance, each with its locations in order.
    let mut groups: Vec<(String, std::collections::VecDeque<usize>)> = Vec::new();
    for (i, d) in of.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| g == d) {
            Some((_, members)) => members.push_back(i),
            None => groups.push((d.clone(), [i].into())),
        }
    }
    let mut order = Vec::with_capacity(zones.len());
    let mut previous: Option<usize> = None;
    while order.len() < zones.len() {
        let pick = |avoid: Option<usize>| {
            (0..groups.len())
                .filter(|&g| Some(g) != avoid && !groups[g].1.is_empty())
                .max_by(|&a, &b| groups[a].1.len().cmp(&groups[b].1.len()).then(b.cmp(&a)))
        };
        let Some(g) = pick(previous).or_else(|| pick(None)) else { break };
        order.extend(groups[g].1.pop_front());
        previous = Some(g);
    }
    order
}

/// The zone tolerance of `n = zones.len()` locations holding stripes of `k + m` shards.
pub fn tolerance(zones: &[String], k: usize, m: usize) -> ZoneTolerance {
    let n = zones.len();
    let of = domains(zones);
    let distinct: std::collections::BTreeSet<&String> = of.iter().collect();
    let named = zones.iter().any(|z| !z.is_empty());
    if n == 0 {
        return ZoneTolerance { domains: 0, named, tolerance: 0, most_in_one: 0 };
    }
    let mut tolerance = distinct.len();
    let mut most_in_one = 0;
    // Every window the placement uses: k+m consecutive locations from each start (wrapping, so with fewer than
    // k+m locations a location holds several shards of a stripe).
    for start in 0..n {
        let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
        for i in 0..k + m {
            *counts.entry(&of[(start + i) % n]).or_default() += 1;
        }
        let mut sizes: Vec<usize> = counts.into_values().collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        most_in_one = most_in_one.max(sizes[0]);
        // The worst t domains to lose are the t holding the most shards of this window.
        let mut lost = 0;
        let mut survives = 0;
        for s in &sizes {
            lost += s;
            if lost > m {
                break;
            }
            survives += 1;
        }
        // Losing domains this window does not use costs it nothing, but the worst choice of t domains is its
        // t largest; only when all of them together fit in m may any number go.
        let window_tolerance = if survives == sizes.len() { distinct.len() } else { survives };
        tolerance = tolerance.min(window_tolerance);
    }
    ZoneTolerance { domains: distinct.len(), named, tolerance, most_in_one }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn without_zones_each_location_is_a_domain_and_m_of_them_may_go() {
        let t = tolerance(&z(&["", "", "", "", "", ""]), 4, 2);
        assert_eq!((t.domains, t.named, t.tolerance, t.most_in_one), (6, false, 2, 1));
    }

    #[test]
    fn zones_holding_at_most_m_shards_each_survive_one_loss_and_bigger_ones_do_not() {
        // 4+2 over three machines of two disks each: any one machine may go, not two.
        let t = tolerance(&z(&["a", "a", "b", "b", "c", "c"]), 4, 2);
        assert_eq!((t.domains, t.tolerance, t.most_in_one), (3, 1, 2));
        // Three disks in one machine: losing it loses three shards of every stripe, more than m.
        let t = tolerance(&z(&["a", "a", "a", "b", "c", "d"]), 4, 2);
        assert_eq!((t.domains, t.tolerance, t.most_in_one), (4, 0, 3));
        // Two zones of three each: one zone is already too much.
        assert_eq!(tolerance(&z(&["a", "a", "a", "b", "b", "b"]), 4, 2).tolerance, 0);
        // A named zone of two next to single disks: any one domain goes, and two only when not that zone
        // plus another: the worst case counts.
        let t = tolerance(&z(&["a", "a", "", "", "", ""]), 4, 2);
        assert_eq!((t.domains, t.tolerance), (5, 1));
    }

    /// Applies an order to zone names.
    fn ordered(zones: &[String]) -> Vec<String> {
        let order = spread_order(zones);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..zones.len()).collect::<Vec<_>>(), "not a permutation");
        order.iter().map(|&i| zones[i].clone()).collect()
    }

    #[test]
    fn the_spread_order_interleaves_zones_and_keeps_a_store_without_them_as_it_is() {
        assert_eq!(spread_order(&z(&["", "", "", ""])), [0, 1, 2, 3]);
        assert_eq!(ordered(&z(&["a", "a", "a", "b", "b", "b"])), z(&["a", "b", "a", "b", "a", "b"]));
        assert_eq!(ordered(&z(&["a", "a", "b", "b", "c", "c"])), z(&["a", "b", "c", "a", "b", "c"]));
        // Listed grouped, 2+1 over six locations in three zones: no longer a zone twice in a stripe.
        let grouped = z(&["a", "a", "b", "b", "c", "c"]);
        assert_eq!(tolerance(&grouped, 2, 1).tolerance, 0);
        assert_eq!(tolerance(&ordered(&grouped), 2, 1).tolerance, 1);
        // Uneven: the big zone is spread first, so its locations are never neighbours.
        let uneven = ordered(&z(&["a", "a", "a", "b", "c", ""]));
        assert!(uneven.windows(2).all(|w| w[0] != w[1] || w[0].is_empty()), "{uneven:?}");
        // Half of six locations in one zone: with windows of three, some stripe has two shards there whatever
        // the order, and the tolerance says so.
        assert_eq!(tolerance(&uneven, 2, 1).tolerance, 0);
        assert_eq!(tolerance(&uneven, 2, 1).most_in_one, 2);
    }

    #[test]
    fn with_more_locations_than_a_stripe_the_worst_window_counts() {
        // 2+1 over six locations: windows of three consecutive ones. Zone "a" holds locations 0 and 5, which
        // are consecutive (mod 6), so a stripe starting at 5 has two shards in "a".
        let t = tolerance(&z(&["a", "b", "c", "d", "e", "a"]), 2, 1);
        assert_eq!((t.tolerance, t.most_in_one), (0, 2));
        // Spread so that no window holds a zone twice: any one zone may go.
        let t = tolerance(&z(&["a", "b", "c", "a", "b", "c"]), 2, 1);
        assert_eq!((t.tolerance, t.most_in_one), (1, 1));
        // With fewer locations than shards, one location holds several shards of a stripe.
        let t = tolerance(&z(&["", "", ""]), 4, 2);
        assert_eq!((t.tolerance, t.most_in_one), (1, 2));
    }
}
