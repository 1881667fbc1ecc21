//! A host that lost its lease answers nothing: not from its caches, and not with
//! data it read after the lease ran out (its extent map may be old by then).

use super::tests::fresh_volume;
use super::*;
use crate::cluster::HostUuid;
use crate::lun::Lun;
use crate::sim::PausableLun;
use std::sync::mpsc;
use std::time::Duration;

const REG: u32 = libc::S_IFREG | 0o644;

/// Runs `op` on a thread; its result, or None if it did not answer within `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    op: impl FnOnce() -> FsResult<T> + Send + 'static,
) -> Option<FsResult<T>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    rx.recv_timeout(limit).ok()
}

fn errno<T: std::fmt::Debug>(what: &str, outcome: Option<FsResult<T>>) -> i32 {
    match outcome {
        Some(Err(e)) => e.errno(),
        Some(Ok(v)) => panic!("{what} on the fenced host answered {v:?}"),
        None => panic!("{what} on the fenced host did not answer"),
    }
}

/// Sleeps until the host's lease has run out by its own clock.
fn wait_past_lease(fs: &Fs) {
    let clock = fs.lease().clock().clone();
    while clock.now_ms() <= fs.lease().expires_at_ms() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_host_paused_past_its_lease_answers_nothing_it_may_have_cached() {
    let mem = fresh_volume(64 << 20);
    let pausable = Arc::new(PausableLun::new(mem.clone()));
    let a_lun: Arc<dyn Lun> = pausable.clone();
    let a = Fs::mount(a_lun, MountOptions::new(HostUuid([1; 16]))).expect("mount a");
    let b = super::tests::mount(&mem, 2);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"old bytes").expect("write");
    a.fsync(f, false).expect("fsync");
    assert_eq!(a.read_data(f, 0, 64).expect("read"), b"old bytes");
    pausable.pause();
    // A read that starts with a valid lease and waits for the LUN (as a stopped host's
    // does) until after B has taken the file over.
    let reader = {
        let a = a.clone();
        std::thread::spawn(move || a.read_data(f, 0, 64))
    };
    wait_past_lease(&a);
    // B recovers A (after A's silence of one lease) and writes over the file.
    let on_b = b.lookup(b.root(), b"f").expect("lookup on b").ino;
    b.write_data(on_b, 0, b"NEW BYTES").expect("write on b");
    b.fsync(on_b, false).expect("fsync on b");
    // Still paused, past its lease: A answers nothing from its caches.
    let limit = Duration::from_secs(5);
    let a2 = a.clone();
    assert_eq!(
        errno("stat", within(limit, move || a2.getattr(f))),
        libc::EIO
    );
    let a2 = a.clone();
    let listing = within(limit, move || {
        let mut names = Vec::new();
        a2.readdir(a2.root(), 0, &mut |_, _, _, name| {
            names.push(name.to_vec());
            false
        })
        .map(|()| names)
    });
    assert_eq!(errno("readdir", listing), libc::EIO);
    let a2 = a.clone();
    assert_eq!(
        errno("lookup", within(limit, move || a2.lookup(a2.root(), b"f"))),
        libc::EIO
    );
    pausable.resume();
    let read = reader.join().expect("reader thread");
    assert_eq!(
        errno("a read begun before the lease ran out", Some(read)),
        libc::EIO
    );
    let a2 = a.clone();
    assert_eq!(
        errno("read", within(limit, move || a2.read_data(f, 0, 64))),
        libc::EIO
    );
    assert_eq!(b.read_data(on_b, 0, 64).expect("read on b"), b"NEW BYTES");
    b.unmount().expect("unmount b");
}
