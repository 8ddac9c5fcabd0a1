//! [`RunLog`]: the optional capability of a store to keep run and attempt records.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures::channel::oneshot;

use crate::record::{AttemptRecord, RunId, RunRecord};
use crate::DuraflowError;

/// A store that records runs and attempts, and commits a task's output together with its
/// `Succeeded` attempt atomically. Reached through [`Storage::run_log`](crate::Storage::run_log).
///
/// Every method is called from async code and **must not block**: queue the work and
/// return; a [`Ticket`] resolves once the work is done, as durably as the store promises.
pub trait RunLog: Send + Sync {
    /// Starts a run and returns its id (increasing with every run of this store that is
    /// recorded: a store may give the id of a run whose records a crash lost to a later run).
    ///
    /// # Errors
    /// Any backend error; the run then proceeds without records.
    fn begin_run(&self, started_ms: u64) -> Result<RunId, DuraflowError>;

    /// Stores (or replaces) an attempt record; durable no later than the next commit's
    /// ticket resolves.
    ///
    /// # Errors
    /// Any backend error.
    fn record(&self, attempt: AttemptRecord) -> Result<(), DuraflowError>;

    /// Like [`record`](RunLog::record), with the task id given as the `Arc` the run shares
    /// (`attempt.key` is left empty). A cached re-run records one `Cached` attempt per task
    /// this way: a store that keeps such records in memory for a while can keep the id
    /// without copying it. The default puts the id into the record and calls `record`.
    ///
    /// # Errors
    /// As [`record`](RunLog::record).
    fn record_shared(
        &self,
        key: &Arc<str>,
        mut attempt: AttemptRecord,
    ) -> Result<(), DuraflowError> {
        attempt.key = key.to_string();
        self.record(attempt)
    }

    /// Stores `value` under `key` and `attempt` in one atomic step: neither exists without
    /// the other after a crash. The ticket resolves when both are as durable as the store
    /// promises.
    ///
    /// # Errors
    /// Any backend error, from the call or through the ticket; the previous value is then
    /// unchanged.
    fn commit(
        &self,
        key: &str,
        value: Vec<u8>,
        attempt: AttemptRecord,
    ) -> Result<Ticket, DuraflowError>;

    /// Stores the final record of a run; the ticket resolves when it, and every record of the
    /// run sent before it, can be read back and is as durable as the store promises for it.
    ///
    /// # Errors
    /// Any backend error.
    fn finish_run(&self, run: RunRecord) -> Result<Ticket, DuraflowError>;
}

/// Resolves when the work it stands for is done (as durably as its store promises), with
/// the outcome of that work.
#[derive(Debug)]
pub struct Ticket(TicketState);

#[derive(Debug)]
enum TicketState {
    Ready(Option<Result<(), DuraflowError>>),
    Pending(oneshot::Receiver<Result<(), DuraflowError>>),
}

/// Resolves a pending [`Ticket`].
#[derive(Debug)]
pub struct TicketSender(oneshot::Sender<Result<(), DuraflowError>>);

impl Ticket {
    /// A ticket that is already resolved with `result`.
    pub fn ready(result: Result<(), DuraflowError>) -> Ticket {
        Ticket(TicketState::Ready(Some(result)))
    }

    /// A ticket and the sender that resolves it. A ticket whose sender is dropped unsent
    /// resolves to [`DuraflowError::RuntimeShutdown`].
    pub fn pending() -> (Ticket, TicketSender) {
        let (tx, rx) = oneshot::channel();
        (Ticket(TicketState::Pending(rx)), TicketSender(tx))
    }
}

impl TicketSender {
    /// Resolves the ticket with `result`.
    pub fn send(self, result: Result<(), DuraflowError>) {
        let _ = self.0.send(result);
    }
}

impl Future for Ticket {
    type Output = Result<(), DuraflowError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            TicketState::Ready(result) => Poll::Ready(result.take().unwrap_or(Ok(()))),
            TicketState::Pending(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| {
                    Err(DuraflowError::RuntimeShutdown {
                        key: "<commit>".to_owned(),
                    })
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A run log that keeps what it is given.
    #[derive(Default)]
    struct Kept(Mutex<Vec<AttemptRecord>>);

    impl RunLog for Kept {
        fn begin_run(&self, _started_ms: u64) -> Result<RunId, DuraflowError> {
            Ok(1)
        }
        fn record(&self, attempt: AttemptRecord) -> Result<(), DuraflowError> {
            self.0.lock().unwrap().push(attempt);
            Ok(())
        }
        fn commit(
            &self,
            _key: &str,
            _value: Vec<u8>,
            _attempt: AttemptRecord,
        ) -> Result<Ticket, DuraflowError> {
            Ok(Ticket::ready(Ok(())))
        }
        fn finish_run(&self, _run: RunRecord) -> Result<Ticket, DuraflowError> {
            Ok(Ticket::ready(Ok(())))
        }
    }

    #[test]
    fn record_shared_by_default_fills_in_the_key_and_records() {
        let log = Kept::default();
        let record = AttemptRecord {
            run: 7,
            key: String::new(),
            attempt: 1,
            started_ms: 10,
            finished_ms: Some(12),
            outcome: crate::AttemptOutcome::Cached,
            duration_us: Some(1_500),
            output_size: Some(9),
        };
        log.record_shared(&Arc::from("t/1"), record.clone())
            .unwrap();
        let kept = log.0.into_inner().unwrap();
        let expected = AttemptRecord {
            key: "t/1".to_owned(),
            ..record
        };
        assert_eq!(kept, [expected]);
    }
}
