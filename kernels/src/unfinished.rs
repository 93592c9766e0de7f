//! Unfinished outputs: the temporary files and folders that become an output by a rename once
//! complete (`.NAME.partial-PID` and the like). Each writer registers its temporary for as long
//! as it exists, and renames it into place inside [`commit`]; a process that is interrupted
//! (Ctrl-C, `kill`) calls [`remove_all`] from its signal handler, so nothing half-written is
//! left behind. The two exclude each other: an output is either put in place whole before the
//! interruption or not at all (after it, [`commit`] waits for the exit), so a writer that goes
//! on for a moment after the removal never renames what is left of its temporary into place.
//! A writer must not create a removed temporary again (`create_dir`, not `create_dir_all`,
//! inside it). A normal error path removes its own temporaries as before; this covers the exit
//! that runs no destructors.
//!
//! Here rather than in the runtime because the exporter and the runtime both write such files
//! (this is the lowest crate both depend on).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

static PENDING: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

fn pending() -> MutexGuard<'static, Vec<(u64, PathBuf)>> {
    // a writer that panicked while registering leaves the list as it was: still usable
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered temporary; dropping it unregisters the path (it does not remove it: the writer
/// renames or removes its temporary itself).
#[derive(Debug)]
#[must_use = "the path is unregistered when this is dropped"]
pub struct Unfinished {
    id: u64,
}

/// Register `path` (a file or a folder, existing or about to be created) as an unfinished output
/// until the returned guard is dropped.
pub fn register(path: impl Into<PathBuf>) -> Unfinished {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    pending().push((id, path.into()));
    Unfinished { id }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        pending().retain(|(id, _)| *id != self.id);
    }
}

/// The paths registered now, oldest first.
#[cfg(test)]
fn registered() -> Vec<PathBuf> {
    pending().iter().map(|(_, p)| p.clone()).collect()
}

/// Run `f`, the renames that put a complete output in place (and the removal of what it
/// replaces), excluded from [`remove_all`]: after an interruption this blocks until the process
/// exits. `f` must not register or drop an [`Unfinished`] (the list is held while it runs).
pub fn commit<T>(f: impl FnOnce() -> T) -> T {
    let _held = pending();
    f()
}

/// Remove every registered path that exists (a folder with its contents) and return those
/// removed. The list stays locked afterwards until the process ends, so that no writer registers
/// (or renames into place) anything new: call this only just before exiting.
///
/// A writer still running creates files in a folder being removed (the removal of the folder
/// itself then fails); such a folder is removed again, up to 50 times 10 ms apart, until the
/// writer has failed for want of it.
pub fn remove_all() -> Vec<PathBuf> {
    let list = pending();
    let mut removed = Vec::new();
    for _ in 0..50 {
        let mut left = false;
        for (_, p) in list.iter() {
            if remove(p) && !removed.contains(p) {
                removed.push(p.clone());
            }
            left |= std::fs::symlink_metadata(p).is_ok();
        }
        if !left {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // held until exit: dropping the guard would let the main thread go on
    std::mem::forget(list);
    removed
}

fn remove(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).is_ok(),
        Ok(_) => std::fs::remove_file(p).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_registers_until_dropped() {
        let d = std::env::temp_dir().join(format!("motionrt-unfinished-{}", std::process::id()));
        let a = register(d.join("a"));
        let b = register(d.join("b"));
        let now = registered();
        assert!(now.contains(&d.join("a")) && now.contains(&d.join("b")));
        drop(a);
        let now = registered();
        assert!(!now.contains(&d.join("a")) && now.contains(&d.join("b")));
        drop(b);
        assert!(!registered().contains(&d.join("b")));
    }

    #[test]
    fn remove_takes_files_and_folders_and_skips_what_is_gone() {
        let d = std::env::temp_dir().join(format!("motionrt-unfinished-rm-{}", std::process::id()));
        std::fs::create_dir_all(d.join("dir/sub")).unwrap();
        std::fs::write(d.join("dir/sub/x"), b"x").unwrap();
        std::fs::write(d.join("file"), b"y").unwrap();
        assert!(remove(&d.join("dir")));
        assert!(remove(&d.join("file")));
        assert!(!remove(&d.join("file")));
        assert!(!d.join("dir").exists() && !d.join("file").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
