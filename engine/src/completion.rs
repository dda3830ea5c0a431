//! One-shot completion cells that carry an I/O result from the thread that reaps it to whoever
//! waits: a blocked thread ([`Completion::wait`]) or an async task (`Completion` is a `Future`).
//! Also [`block_on`], which runs the engine's async paths on the calling thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

/// The producer went away without producing a value (its thread stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canceled;

enum State<T> {
    Pending(Option<Waker>),
    Ready(T),
    Canceled,
    Taken,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settle(&self, new_state: State<T>) {
        let waker = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, new_state) {
                State::Pending(waker) => waker,
                other => {
                    *state = other;
                    None
                }
            }
        };
        self.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The receiving half: wait for the value or await it.
pub struct Completion<T> {
    shared: Arc<Shared<T>>,
}

/// The sending half. Dropping it without [`Completer::complete`] cancels the completion.
pub struct Completer<T> {
    shared: Option<Arc<Shared<T>>>,
}

impl<T> std::fmt::Debug for Completion<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

impl<T> std::fmt::Debug for Completer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completer")
    }
}

/// A connected completer/completion pair.
pub fn completion<T>() -> (Completer<T>, Completion<T>) {
    let shared = Arc::new(Shared { state: Mutex::new(State::Pending(None)), ready: Condvar::new() });
    (Completer { shared: Some(shared.clone()) }, Completion { shared })
}

impl<T> Completer<T> {
    /// Delivers the value and wakes the waiter.
    pub fn complete(mut self, value: T) {
        if let Some(shared) = self.shared.take() {
            shared.settle(State::Ready(value));
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.settle(State::Canceled);
        }
    }
}

impl<T> Completion<T> {
    /// A completion that is already settled with `value`.
    pub fn ready(value: T) -> Completion<T> {
        let (tx, rx) = completion();
        tx.complete(value);
        rx
    }

    /// Blocks the calling thread until the value arrives.
    pub fn wait(self) -> Result<T, Canceled> {
        let mut state = self.shared.lock();
        loop {
            match std::mem::replace(&mut *state, State::Taken) {
                State::Ready(v) => return Ok(v),
                State::Canceled => return Err(Canceled),
                State::Taken => return Err(Canceled),
                pending @ State::Pending(_) => {
                    *state = pending;
                    state = self.shared.ready.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }
}

impl<T> Future for Completion<T> {
    type Output = Result<T, Canceled>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.shared.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Ready(v) => Poll::Ready(Ok(v)),
            State::Canceled | State::Taken => Poll::Ready(Err(Canceled)),
            State::Pending(_) => {
                *state = State::Pending(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    static THREAD_WAKER: Waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
}

/// Runs `future` to completion on the calling thread, parking it while the future waits.
/// Do not call this from inside an async runtime's worker thread; await the future instead.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    THREAD_WAKER.with(|waker| {
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    })
}

/// Polls futures concurrently on the current task and returns their outputs in order (no
/// spawning, so the futures may borrow).
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<Option<Pin<Box<F>>>> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut all_done = true;
        for (slot, out) in pending.iter_mut().zip(done.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done { Poll::Ready(done.iter_mut().filter_map(Option::take).collect()) } else { Poll::Pending }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_receives_value_from_another_thread() {
        let (tx, rx) = completion();
        let t = std::thread::spawn(move || tx.complete(42));
        assert_eq!(rx.wait(), Ok(42));
        t.join().unwrap();
    }

    #[test]
    fn block_on_awaits_completion() {
        let (tx, rx) = completion();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            tx.complete("done");
        });
        assert_eq!(block_on(rx), Ok("done"));
        t.join().unwrap();
    }

    #[test]
    fn join_all_keeps_order() {
        let (tx1, rx1) = completion();
        let (tx2, rx2) = completion();
        let t = std::thread::spawn(move || {
            tx2.complete(2);
            std::thread::sleep(std::time::Duration::from_millis(5));
            tx1.complete(1);
        });
        let got = block_on(join_all(vec![rx1, rx2]));
        assert_eq!(got, vec![Ok(1), Ok(2)]);
        t.join().unwrap();
    }

    #[test]
    fn dropped_completer_cancels() {
        let (tx, rx) = completion::<u8>();
        drop(tx);
        assert_eq!(rx.wait(), Err(Canceled));
        let (tx, rx) = completion::<u8>();
        let t = std::thread::spawn(move || drop(tx));
        assert_eq!(block_on(rx), Err(Canceled));
        t.join().unwrap();
    }
}
