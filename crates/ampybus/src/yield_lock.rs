//! Taking a `std::sync::Mutex` from async code without stalling the thread.
//!
//! A thread that blocks on a contended lock runs none of its other tasks; on a two-core
//! machine that is half the machine idle while the holder (a fetch reading a batch, an ack
//! writing its journal frame, a batch being queued by key) finishes. [`lock_yielding`] tries
//! the lock and, while another thread holds it, yields to the runtime between tries, so the
//! thread runs other tasks meanwhile; after [`LOCK_YIELDS`] tries it blocks as `lock` would.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll};

/// Tries of [`lock_yielding`] before it blocks.
pub(crate) const LOCK_YIELDS: u32 = 4096;

/// The guard of `m`, taken without blocking the thread while another thread holds it (a
/// poisoned lock is taken as it is: the data it guards is kept consistent by its users).
pub(crate) fn lock_yielding<T>(m: &Mutex<T>) -> LockYielding<'_, T> {
    LockYielding { m, tries: 0 }
}

/// The future of [`lock_yielding`].
pub(crate) struct LockYielding<'a, T> {
    m: &'a Mutex<T>,
    tries: u32,
}

impl<'a, T> Future for LockYielding<'a, T> {
    type Output = MutexGuard<'a, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<MutexGuard<'a, T>> {
        match self.m.try_lock() {
            Ok(g) => Poll::Ready(g),
            Err(TryLockError::Poisoned(p)) => Poll::Ready(p.into_inner()),
            Err(TryLockError::WouldBlock) if self.tries < LOCK_YIELDS => {
                self.tries += 1;
                // Woken at once: polled again after the thread's other ready tasks.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Err(TryLockError::WouldBlock) => {
                Poll::Ready(self.m.lock().unwrap_or_else(|p| p.into_inner()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_for_the_holder_and_counts_every_increment() {
        let m = Arc::new(Mutex::new(0u64));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..1000 {
                    *lock_yielding(&m).await += 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*m.lock().unwrap(), 8000);
    }

    #[test]
    fn a_held_lock_is_pending_then_taken_when_let_go() {
        let m = Mutex::new(1u32);
        let held = m.lock().unwrap();
        let mut fut = std::pin::pin!(lock_yielding(&m));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(held);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(g) => assert_eq!(*g, 1),
            Poll::Pending => panic!("the lock was let go but the future is still pending"),
        }
    }
}
