//! What of a task's output is stored: all of it ([`Plain`]), or the `Ok` side of a
//! `Result` ([`Fallible`]).

use std::fmt::Display;

use serde::{de::DeserializeOwned, Serialize};

mod sealed {
    pub trait Sealed {}
}

/// How a task's output `O` relates to what the store keeps. Implemented by [`Plain`] and
/// [`Fallible`] only.
pub trait OutputKind<O>: sealed::Sealed + Send + Sync + 'static {
    /// The type whose value is stored.
    type Stored: Serialize + DeserializeOwned + Send + 'static;

    /// What to store for `output`, or the error text when the task failed (nothing is
    /// stored then).
    fn stored(output: &O) -> Result<&Self::Stored, String>;

    /// The output a task returns when `stored` was found in the store.
    fn from_stored(stored: Self::Stored) -> O;
}

/// Every output is stored as it is: the kind of tasks added with
/// [`DurableDag::add`](crate::DurableDag::add).
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

/// The task returns `Result<T, E>`: `Ok(T)` is stored (as a `T`), an `Err` is a failed
/// attempt that is never stored. The kind of tasks added with
/// [`DurableDag::add_fallible`](crate::DurableDag::add_fallible).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fallible;

impl sealed::Sealed for Plain {}
impl sealed::Sealed for Fallible {}

impl<O> OutputKind<O> for Plain
where
    O: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = O;

    fn stored(output: &O) -> Result<&O, String> {
        Ok(output)
    }

    fn from_stored(stored: O) -> O {
        stored
    }
}

impl<T, E> OutputKind<Result<T, E>> for Fallible
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Display,
{
    type Stored = T;

    fn stored(output: &Result<T, E>) -> Result<&T, String> {
        output.as_ref().map_err(|e| e.to_string())
    }

    fn from_stored(stored: T) -> Result<T, E> {
        Ok(stored)
    }
}
