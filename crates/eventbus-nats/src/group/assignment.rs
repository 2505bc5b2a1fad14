//! Which partitions an instance should own, computed the same way by every instance from the
//! same member list.

use std::collections::BTreeSet;

/// The partitions of `partitions` that `me` owns when `members` are the live instances:
/// members sorted by name take partitions round robin (partition `p` goes to member
/// `p mod n`), so shares differ by at most one. `me` counts as a member even when the list
/// does not show it yet. Two instances that briefly see different member lists may both want
/// a partition; the lease decides, and the next heartbeat agrees again.
pub(crate) fn owned_partitions(members: &[String], me: &str, partitions: u16) -> BTreeSet<u16> {
    let mut sorted: Vec<&str> = members.iter().map(String::as_str).collect();
    if !sorted.contains(&me) {
        sorted.push(me);
    }
    sorted.sort_unstable();
    sorted.dedup();
    let Some(index) = sorted.iter().position(|m| *m == me) else {
        return BTreeSet::new();
    };
    let n = sorted.len();
    (0..partitions)
        .filter(|p| usize::from(*p) % n == index)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_lone_instance_owns_every_partition() {
        assert_eq!(owned_partitions(&[], "a", 4), BTreeSet::from([0, 1, 2, 3]));
    }

    #[test]
    fn members_share_every_partition_exactly_once() {
        let members = names(&["c", "a", "b"]);
        let mut all = Vec::new();
        for m in ["a", "b", "c"] {
            let mine = owned_partitions(&members, m, 16);
            assert!((5..=6).contains(&mine.len()), "{m}: {mine:?}");
            all.extend(mine);
        }
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn the_list_order_does_not_matter() {
        let a = owned_partitions(&names(&["x", "y"]), "y", 8);
        let b = owned_partitions(&names(&["y", "x", "y"]), "y", 8);
        assert_eq!(a, b);
    }
}
