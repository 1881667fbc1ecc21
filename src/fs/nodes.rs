//! The inodes the kernel knows through this host's FUSE mount ("nodes"), each with
//! the generation it was looked up with.
//!
//! A FUSE node id is an inode number, which is a block number, and a freed inode's
//! block is reused: for a new inode (another generation) or for data. The kernel may
//! hold a node id long after the inode is gone (a shell's cwd). Operations on a node
//! id check, under the core lock, that the inode still has the generation the kernel
//! looked it up with, and fail with ESTALE otherwise; `Meta::need` refuses to take a
//! lock in a block that is not an inode any more.
//!
//! The adapter reports every reply that hands the kernel a node (`remember`: lookup,
//! create, mknod, mkdir, symlink, link) and every `forget`. A node the kernel forgot
//! (or never got, such as the root, and every inode number of a caller that is not
//! the kernel) is not checked here: its operations load the inode as they are. Names
//! are not tracked: the kernel's dentries are not invalidated (docs/locking.md, "The
//! kernel's caches"), they expire with the entry TTL.

use super::Ino;
use std::collections::HashMap;
use std::sync::Mutex;

/// A node the kernel holds: the generation it was last handed with, and how many
/// lookups the kernel has not forgotten yet.
#[derive(Clone, Copy, Debug)]
struct Known {
    generation: u64,
    lookups: u64,
}

#[derive(Default)]
pub struct KernelNodes {
    table: Mutex<HashMap<Ino, Known>>,
}

impl KernelNodes {
    /// The kernel got `ino` with `generation` (one more lookup). A newer generation
    /// replaces the old one: the kernel drops its inode of the old generation when it
    /// sees the new one for the same node id.
    pub fn remember(&self, ino: Ino, generation: u64) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let entry = table.entry(ino).or_insert(Known {
            generation,
            lookups: 0,
        });
        entry.generation = generation;
        entry.lookups = entry.lookups.saturating_add(1);
    }

    /// Up to `max` of the node ids the kernel holds.
    pub fn all(&self, max: usize) -> Vec<Ino> {
        let Ok(table) = self.table.lock() else {
            return Vec::new();
        };
        table.keys().copied().take(max).collect()
    }

    /// The kernel forgot `lookups` of its lookups of `ino`.
    pub fn forget(&self, ino: Ino, lookups: u64) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let Some(entry) = table.get_mut(&ino) else {
            return;
        };
        entry.lookups = entry.lookups.saturating_sub(lookups);
        if entry.lookups == 0 {
            table.remove(&ino);
        }
    }

    /// The generation the kernel knows `ino` by, if it holds it.
    pub fn generation(&self, ino: Ino) -> Option<u64> {
        self.table.lock().ok()?.get(&ino).map(|k| k.generation)
    }

    /// Nodes the kernel holds.
    pub fn len(&self) -> usize {
        self.table.lock().map_or(0, |t| t.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_follow_lookups_and_forgets() {
        let nodes = KernelNodes::default();
        nodes.remember(10, 7);
        nodes.remember(11, 8);
        nodes.remember(10, 7);
        assert_eq!(nodes.len(), 2);
        nodes.forget(10, 1);
        assert_eq!(nodes.generation(10), Some(7), "one lookup of 10 is left");
        nodes.forget(10, 1);
        assert_eq!(nodes.generation(10), None);
        // A new generation of a node id replaces the old one.
        nodes.remember(11, 9);
        assert_eq!(nodes.generation(11), Some(9));
        nodes.forget(11, 2);
        assert!(nodes.is_empty());
    }
}
