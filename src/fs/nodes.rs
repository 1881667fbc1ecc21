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
//! create, mknod, mkdir, symlink, link) and every `forget`. The names the nodes were
//! handed under are kept too: when another host changes a directory, the kernel's
//! dentries in it are invalidated (`Fs::invalidate_kernel`). A node the kernel forgot
//! (or never got, such as the root, and every inode number of a caller that is not
//! the kernel) is not checked here: its operations load the inode as they are.

use super::Ino;
use std::collections::HashMap;
use std::sync::Mutex;

/// Names remembered per node (the kernel's dentries of it; a node with more hard
/// links seen keeps its latest names).
const NAMES_PER_NODE_MAX: usize = 4;

/// A node the kernel holds: the generation it was last handed with, how many lookups
/// the kernel has not forgotten yet, and the names (parent, name) it was handed under.
#[derive(Clone, Debug)]
struct Known {
    generation: u64,
    lookups: u64,
    names: Vec<(Ino, Vec<u8>)>,
}

#[derive(Default)]
struct Table {
    known: HashMap<Ino, Known>,
    /// parent -> name -> node: the kernel's dentries, as far as this host handed them
    /// out, so that a directory another host changed can have them invalidated.
    by_parent: HashMap<Ino, HashMap<Vec<u8>, Ino>>,
}

impl Table {
    fn unlink_name(&mut self, parent: Ino, name: &[u8]) -> Option<Ino> {
        let names = self.by_parent.get_mut(&parent)?;
        let child = names.remove(name)?;
        if names.is_empty() {
            self.by_parent.remove(&parent);
        }
        if let Some(known) = self.known.get_mut(&child) {
            known.names.retain(|(p, n)| !(*p == parent && n == name));
        }
        Some(child)
    }

    fn link_name(&mut self, parent: Ino, name: &[u8], child: Ino) {
        let Some(known) = self.known.get_mut(&child) else {
            return;
        };
        if known.names.iter().any(|(p, n)| *p == parent && n == name) {
            return;
        }
        known.names.push((parent, name.to_vec()));
        let dropped = if known.names.len() > NAMES_PER_NODE_MAX {
            Some(known.names.remove(0))
        } else {
            None
        };
        if let Some((old_parent, old_name)) = dropped {
            self.unlink_name(old_parent, &old_name);
        }
        if let Some(previous) = self
            .by_parent
            .entry(parent)
            .or_default()
            .insert(name.to_vec(), child)
        {
            if previous != child {
                if let Some(known) = self.known.get_mut(&previous) {
                    known.names.retain(|(p, n)| !(*p == parent && n == name));
                }
            }
        }
    }
}

#[derive(Default)]
pub struct KernelNodes {
    table: Mutex<Table>,
}

impl KernelNodes {
    /// The kernel got `ino` with `generation` under `name` in `parent` (one more
    /// lookup). A newer generation replaces the old one: the kernel drops its inode of
    /// the old generation when it sees the new one for the same node id.
    pub fn remember(&self, parent: Ino, name: &[u8], ino: Ino, generation: u64) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let entry = table.known.entry(ino).or_insert(Known {
            generation,
            lookups: 0,
            names: Vec::new(),
        });
        entry.generation = generation;
        entry.lookups = entry.lookups.saturating_add(1);
        table.link_name(parent, name, ino);
    }

    /// Up to `max` of the node ids the kernel holds.
    pub fn all(&self, max: usize) -> Vec<Ino> {
        let Ok(table) = self.table.lock() else {
            return Vec::new();
        };
        table.known.keys().copied().take(max).collect()
    }

    /// The kernel forgot `lookups` of its lookups of `ino`.
    pub fn forget(&self, ino: Ino, lookups: u64) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let Some(entry) = table.known.get_mut(&ino) else {
            return;
        };
        entry.lookups = entry.lookups.saturating_sub(lookups);
        if entry.lookups > 0 {
            return;
        }
        let names = std::mem::take(&mut entry.names);
        table.known.remove(&ino);
        for (parent, name) in names {
            if table.by_parent.get(&parent).and_then(|n| n.get(&name)) == Some(&ino) {
                table.unlink_name(parent, &name);
            }
        }
    }

    /// This host renamed `parent/name` to `new_parent/new_name` (the kernel moved
    /// its dentry); with `exchange`, the two names swapped their nodes.
    pub fn renamed(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        exchange: bool,
    ) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let moved = table.unlink_name(parent, name);
        let replaced = table.unlink_name(new_parent, new_name);
        if let Some(child) = moved {
            table.link_name(new_parent, new_name, child);
        }
        if let Some(child) = replaced.filter(|_| exchange) {
            table.link_name(parent, name, child);
        }
    }

    /// This host removed `parent/name` (the kernel dropped its dentry).
    pub fn unlinked(&self, parent: Ino, name: &[u8]) {
        if let Ok(mut table) = self.table.lock() {
            table.unlink_name(parent, name);
        }
    }

    /// The generation the kernel knows `ino` by, if it holds it.
    pub fn generation(&self, ino: Ino) -> Option<u64> {
        self.table
            .lock()
            .ok()?
            .known
            .get(&ino)
            .map(|k| k.generation)
    }

    /// Up to `max` names the kernel may hold in directory `parent`.
    pub fn names_in(&self, parent: Ino, max: usize) -> Vec<Vec<u8>> {
        let Ok(table) = self.table.lock() else {
            return Vec::new();
        };
        table
            .by_parent
            .get(&parent)
            .map(|names| names.keys().take(max).cloned().collect())
            .unwrap_or_default()
    }

    /// Nodes the kernel holds.
    pub fn len(&self) -> usize {
        self.table.lock().map_or(0, |t| t.known.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_lookups_renames_and_forgets() {
        let nodes = KernelNodes::default();
        nodes.remember(1, b"a", 10, 7);
        nodes.remember(1, b"b", 11, 8);
        nodes.remember(2, b"a-link", 10, 7);
        let mut in_1 = nodes.names_in(1, 10);
        in_1.sort();
        assert_eq!(in_1, vec![b"a".to_vec(), b"b".to_vec()]);
        nodes.renamed(1, b"a", 2, b"moved", false);
        assert_eq!(nodes.names_in(1, 10), vec![b"b".to_vec()]);
        assert_eq!(nodes.names_in(2, 10).len(), 2);
        nodes.forget(10, 2);
        assert_eq!(nodes.generation(10), None);
        assert!(nodes.names_in(2, 10).is_empty());
        nodes.unlinked(1, b"b");
        assert!(nodes.names_in(1, 10).is_empty());
        assert_eq!(nodes.generation(11), Some(8));
        nodes.forget(11, 1);
        assert!(nodes.is_empty());
    }
}
