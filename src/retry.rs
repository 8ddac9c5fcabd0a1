//! [`RetryPolicy`]: how many times a failing task is attempted, and how long to wait between
//! attempts; and [`Work`], a task and its input as its attempts use them.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use dagx::Task;
use futures::future::BoxFuture;
use futures::FutureExt;

/// How a task that fails (returns `Err`, panics or times out) is attempted again.
///
/// The default makes one attempt: no retry, no timeout. Retrying runs a fresh clone of the
/// task on a clone of its input, so it applies to tasks added with
/// [`DurableDag::add_fallible_with`](crate::DurableDag::add_fallible_with) or
/// [`DurableDag::add_with_retry`](crate::DurableDag::add_with_retry), whose bounds require
/// `Clone`.
///
/// Attempt `n + 1` starts after a backoff of `initial_backoff * 2^(n - 1)`, capped at
/// `max_backoff`; with jitter (the default) the wait is drawn uniformly from zero to that
/// value ("full jitter"), so tasks failing together do not retry in lockstep.
///
/// Backoff and timeouts use tokio's timer: a DAG with retries or timeouts must run inside a
/// tokio runtime with its time driver enabled (`enable_time` or `enable_all`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    jitter: bool,
    timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            jitter: true,
            timeout: None,
        }
    }
}

impl RetryPolicy {
    /// At most `max_attempts` attempts (at least one), 100 ms initial backoff doubling up to
    /// 30 s, with jitter and no timeout.
    pub fn attempts(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// Sets the wait before the second attempt, and the cap the doubling stops at.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> RetryPolicy {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Turns jitter on (the default) or off; without it the waits are exactly the doubling
    /// sequence.
    pub fn jitter(mut self, jitter: bool) -> RetryPolicy {
        self.jitter = jitter;
        self
    }

    /// Cuts every attempt off after `timeout`: the attempt is recorded as failed
    /// ("timed out") and retried like any other failure. The task's future is dropped.
    pub fn timeout(mut self, timeout: Duration) -> RetryPolicy {
        self.timeout = Some(timeout);
        self
    }

    /// The most attempts made at one task in one run.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The per-attempt timeout, if any.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The longest wait before attempt `next` (2 or more) without jitter.
    pub fn backoff_ceiling(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(31);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    /// The wait before attempt `next` (2 or more): the ceiling, or with jitter a uniform
    /// draw from zero to it.
    pub(crate) fn backoff_before(&self, next: u32) -> Duration {
        let ceiling = self.backoff_ceiling(next);
        if self.jitter {
            ceiling.mul_f64(fastrand::f64())
        } else {
            ceiling
        }
    }
}

/// A retry policy with the means to attempt a task afresh: a clone of the task run on a
/// clone of its input, received once from dagx's channels.
pub(crate) struct Retry<I, O> {
    policy: RetryPolicy,
    attempt: AttemptFn<I, O>,
    extract: ExtractFn<I>,
}

/// Runs a fresh clone of the task on a clone of the input.
type AttemptFn<I, O> = Box<dyn Fn(&I) -> BoxFuture<'static, O> + Send>;
/// Receives the input from dagx's channels.
type ExtractFn<I> = fn(Vec<Box<dyn Any + Send>>) -> BoxFuture<'static, Extracted<I>>;

impl<I, O> Retry<I, O>
where
    I: Clone + Send + Sync + 'static,
    O: 'static,
{
    /// Attempts of `task` under `policy`.
    pub(crate) fn of<Tk>(task: Tk, policy: RetryPolicy) -> Box<Self>
    where
        Tk: Task<Input = I, Output = O> + Clone + 'static,
    {
        Box::new(Retry {
            policy,
            attempt: Box::new(move |input: &I| Box::pin(task.clone().run(input.clone()))),
            extract: |receivers| Box::pin(extract_input::<I>(receivers)),
        })
    }
}

/// Where a task's input comes from.
pub(crate) enum Inputs<I> {
    /// Handed over by the caller ([`Task::run`], [`Durable::run_result`](crate::Durable::run_result)).
    Given(I),
    /// dagx's dependency channels, extracted by the inner task.
    Channels(Vec<Box<dyn Any + Send>>),
}

/// What running a task once gave.
pub(crate) enum Ran<O> {
    Output(O),
    /// The input could not be had: a dependency failed.
    NoInput(String),
    Panicked(Box<dyn Any + Send>),
    TimedOut(Duration),
}

/// A task and its input, as its attempts use them.
pub(crate) enum Work<Tk: Task> {
    /// One attempt: the task and its input are used up by it.
    Once(Option<(Tk, Inputs<Tk::Input>)>),
    /// Any number of attempts, each on a clone of the input, once it is extracted.
    Retry {
        retry: Box<Retry<Tk::Input, Tk::Output>>,
        inner: Option<Tk>,
        inputs: Option<Inputs<Tk::Input>>,
        input: Option<Tk::Input>,
    },
}

impl<Tk: Task> Work<Tk>
where
    Tk::Output: 'static,
{
    pub(crate) fn new(
        inner: Tk,
        inputs: Inputs<Tk::Input>,
        retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
    ) -> Self {
        match retry {
            None => Work::Once(Some((inner, inputs))),
            Some(retry) => Work::Retry {
                retry,
                inner: Some(inner),
                inputs: Some(inputs),
                input: None,
            },
        }
    }

    /// The most attempts this task gets.
    pub(crate) fn max_attempts(&self) -> u32 {
        match self {
            Work::Once(_) => 1,
            Work::Retry { retry, .. } => retry.policy.max_attempts(),
        }
    }

    /// The wait before attempt `next`.
    pub(crate) fn backoff_before(&self, next: u32) -> Duration {
        match self {
            Work::Once(_) => Duration::ZERO,
            Work::Retry { retry, .. } => retry.policy.backoff_before(next),
        }
    }

    /// Runs the next attempt, catching a panic and applying the policy's timeout.
    pub(crate) async fn run(&mut self, id: &str) -> Ran<Tk::Output> {
        match self {
            Work::Once(once) => match once.take() {
                Some((inner, Inputs::Given(input))) => caught(inner.run(input).map(Ok)).await,
                Some((inner, Inputs::Channels(receivers))) => {
                    caught(inner.extract_and_run(receivers)).await
                }
                None => Ran::NoInput("the task was already run".to_owned()),
            },
            Work::Retry {
                retry,
                inner,
                inputs,
                input,
            } => Box::pin(retry_attempt(id, retry, inner, inputs, input)).await,
        }
    }
}

/// One attempt of a task with a retry policy: its input is received once, then each attempt
/// runs a fresh clone of the task on a clone of it, cut off after the policy's timeout.
async fn retry_attempt<Tk: Task>(
    id: &str,
    retry: &mut Retry<Tk::Input, Tk::Output>,
    inner: &mut Option<Tk>,
    inputs: &mut Option<Inputs<Tk::Input>>,
    input: &mut Option<Tk::Input>,
) -> Ran<Tk::Output> {
    if input.is_none() {
        match inputs.take() {
            Some(Inputs::Given(given)) => *input = Some(given),
            Some(Inputs::Channels(receivers)) => match (retry.extract)(receivers).await {
                Extracted::Input(Ok(extracted)) => *input = Some(extracted),
                Extracted::Input(Err(message)) => return Ran::NoInput(message),
                Extracted::Unsupported(receivers) => {
                    // dagx hands two or more inputs over in a form only the task itself can
                    // unpack: one attempt, no retry.
                    tracing::warn!(
                        key = id,
                        "a task with several dependencies is attempted once"
                    );
                    let Some(inner) = inner.take() else {
                        return Ran::NoInput("the task was already run".into());
                    };
                    retry.policy = RetryPolicy::attempts(1);
                    return caught(inner.extract_and_run(receivers)).await;
                }
            },
            None => return Ran::NoInput("the task's input is gone".to_owned()),
        }
    }
    let Some(given) = input.as_ref() else {
        return Ran::NoInput("the task's input is gone".to_owned());
    };
    let attempt = (retry.attempt)(given).map(Ok);
    match retry.policy.attempt_timeout() {
        None => caught(attempt).await,
        Some(limit) => match tokio::time::timeout(limit, caught(attempt)).await {
            Ok(ran) => ran,
            Err(_) => Ran::TimedOut(limit),
        },
    }
}

/// Runs one attempt's future, catching its panic.
async fn caught<O>(attempt: impl Future<Output = Result<O, String>>) -> Ran<O> {
    match AssertUnwindSafe(attempt).catch_unwind().await {
        Ok(Ok(value)) => Ran::Output(value),
        Ok(Err(message)) => Ran::NoInput(message),
        Err(panic) => Ran::Panicked(panic),
    }
}

/// What [`extract_input`] could make of dagx's channels.
enum Extracted<I> {
    Input(Result<I, String>),
    /// Two or more channels: their types are known only to the task's own extraction.
    Unsupported(Vec<Box<dyn Any + Send>>),
}

/// Receives a task's input from dagx's channels the way dagx's `#[task]` does for zero or
/// one dependency (a `oneshot::Receiver<Arc<I>>`), so it can be cloned for every attempt.
async fn extract_input<I: Clone + Send + Sync + 'static>(
    mut receivers: Vec<Box<dyn Any + Send>>,
) -> Extracted<I> {
    match receivers.len() {
        0 => match (Box::new(()) as Box<dyn Any>).downcast::<I>() {
            Ok(unit) => Extracted::Input(Ok(*unit)),
            Err(_) => Extracted::Input(Err("expected dependencies, got none".to_owned())),
        },
        1 => {
            let Some(receiver) = receivers.pop() else {
                return Extracted::Unsupported(receivers);
            };
            match receiver.downcast::<futures::channel::oneshot::Receiver<Arc<I>>>() {
                Ok(rx) => Extracted::Input(
                    rx.await
                        .map(|value| I::clone(&value))
                        .map_err(|_| "the dependency produced no output".to_owned()),
                ),
                Err(receiver) => Extracted::Unsupported(vec![receiver]),
            }
        }
        _ => Extracted::Unsupported(receivers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = RetryPolicy::attempts(10)
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .jitter(false);
        let waits: Vec<u128> = (2..=6).map(|n| p.backoff_before(n).as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 50, 50]);
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        let p =
            RetryPolicy::attempts(5).backoff(Duration::from_millis(100), Duration::from_secs(1));
        for n in 2..=5 {
            for _ in 0..100 {
                assert!(p.backoff_before(n) <= p.backoff_ceiling(n));
            }
        }
    }

    #[test]
    fn at_least_one_attempt_and_no_overflow() {
        assert_eq!(RetryPolicy::attempts(0).max_attempts(), 1);
        let p = RetryPolicy::attempts(u32::MAX).jitter(false);
        assert_eq!(p.backoff_before(u32::MAX), Duration::from_secs(30));
    }
}
