//! [`DurableTask`]: a task added to a [`DurableDag`](crate::DurableDag), and [`Deps`], what
//! its `depends_on` takes: dagx's forms, with the ids of the tasks they name recorded, so
//! that a keyed task knows which outputs it consumes.

// `Deps` is sealed; its hidden methods take the run's own state, which stays private.
#![allow(private_interfaces)]

use std::sync::Arc;

use dagx::{DagError, DagRunner, Pending, Task, TaskBuilder, TaskHandle};

use crate::run::RunState;
use crate::slot::Slot;
use crate::{Durable, OutputKind};

/// A task added to a [`DurableDag`](crate::DurableDag), before its dependencies are given:
/// as dagx's own builder, it takes [`depends_on`](DurableTask::depends_on), and a task
/// without inputs converts into a [`TaskHandle`] (for `dag.get(..)` and as a dependency).
pub struct DurableTask<'a, Tk, K>
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
    dag: &'a DagRunner,
    slot: Arc<Slot>,
    run: Arc<RunState>,
}

impl<Tk, K> std::fmt::Debug for DurableTask<'_, Tk, K>
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableTask")
            .field("id", &self.slot.id)
            .finish_non_exhaustive()
    }
}

impl<'a, Tk, K> DurableTask<'a, Tk, K>
where
    Tk: Task,
    Tk::Output: Clone + Send + Sync + 'static,
    K: OutputKind<Tk::Output>,
{
    pub(crate) fn new(
        builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
        dag: &'a DagRunner,
        slot: Arc<Slot>,
        run: Arc<RunState>,
    ) -> Self {
        DurableTask {
            builder,
            dag,
            slot,
            run,
        }
    }

    /// The task's id.
    pub fn id(&self) -> &str {
        &self.slot.id
    }

    /// Sets this keyed task's own code version, over the DAG's
    /// ([`DurableDag::with_code_version`](crate::DurableDag::with_code_version)); a task
    /// added with [`add`](crate::DurableDag::add) has none, and is left as it is.
    pub fn with_code_version(self, version: impl Into<String>) -> Self {
        if self.slot.code_version.set(version.into()).is_err() {
            tracing::warn!(
                key = &*self.slot.id,
                "with_code_version called twice: the first stays"
            );
        }
        self
    }

    /// Makes the task consume the outputs of `deps`, in dagx's forms: a handle, a task of
    /// this `DurableDag` without inputs, or a tuple of either (up to 8), in the order of the
    /// task's inputs. Returns dagx's handle of the task's output.
    pub fn depends_on<D: Deps<Tk::Input>>(self, deps: D) -> TaskHandle<Tk::Output> {
        self.slot.depends(deps.slots(self.dag, &self.run));
        let handle = deps.attach(self.builder);
        self.run.locate(node_of(self.dag, &handle), &self.slot);
        handle
    }
}

/// A task without inputs is its own handle.
impl<'a, Tk, K> From<DurableTask<'a, Tk, K>> for TaskHandle<Tk::Output>
where
    Tk: Task<Input = ()>,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
    Tk::Output: Clone + Send + Sync + 'static,
{
    fn from(task: DurableTask<'a, Tk, K>) -> Self {
        TaskHandle::from(&task)
    }
}

/// A task without inputs is its own handle.
impl<'a, Tk, K> From<&DurableTask<'a, Tk, K>> for TaskHandle<Tk::Output>
where
    Tk: Task<Input = ()>,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
    Tk::Output: Clone + Send + Sync + 'static,
{
    fn from(task: &DurableTask<'a, Tk, K>) -> Self {
        let handle = TaskHandle::from(&task.builder);
        task.run.locate(node_of(task.dag, &handle), &task.slot);
        handle
    }
}

/// The number dagx gives the task of `handle` (found before the run, when no output is
/// there: dagx's `get` names the task it has no result for), or `None`.
pub(crate) fn node_of<T: Clone + Send + Sync + 'static>(
    dag: &DagRunner,
    handle: &TaskHandle<T>,
) -> Option<usize> {
    match dag.get::<T, _>(handle) {
        Err(DagError::ResultNotFound { task_id }) => Some(task_id),
        _ => None,
    }
}

mod sealed {
    pub trait Sealed {}
}

/// What [`DurableTask::depends_on`] takes: a [`TaskHandle`] (or a reference to one), a
/// [`DurableTask`] without inputs (by reference), or a tuple of up to 8 handles or of up to
/// 8 such tasks. Implemented by those only.
pub trait Deps<Input>: sealed::Sealed {
    /// The tasks named, in order (`None` for a task of no `DurableDag`).
    #[doc(hidden)]
    fn slots(&self, dag: &DagRunner, run: &RunState) -> Vec<Option<Arc<Slot>>>;

    /// Gives `builder` these dependencies, through dagx.
    #[doc(hidden)]
    fn attach<'a, Tk, K>(
        self,
        builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
    ) -> TaskHandle<Tk::Output>
    where
        Tk: Task<Input = Input>,
        Tk::Output: 'static,
        K: OutputKind<Tk::Output>;
}

/// The slot of the task of `handle`, if it is a task of `run`.
fn slot_of<T: Clone + Send + Sync + 'static>(
    dag: &DagRunner,
    run: &RunState,
    handle: &TaskHandle<T>,
) -> Option<Arc<Slot>> {
    run.slot_at(node_of(dag, handle)?)
}

/// `Deps` for one handle, in each of dagx's four forms (`$handle` reaches it from `self`).
macro_rules! deps_handle {
    ($($form:ty => |$this:ident| $handle:expr;)+) => {$(
        impl<T> sealed::Sealed for $form {}

        impl<T: Clone + Send + Sync + 'static> Deps<T> for $form {
            fn slots(&self, dag: &DagRunner, run: &RunState) -> Vec<Option<Arc<Slot>>> {
                let $this = self;
                vec![slot_of(dag, run, $handle)]
            }
            fn attach<'a, Tk, K>(
                self,
                builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
            ) -> TaskHandle<Tk::Output>
            where
                Tk: Task<Input = T>,
                Tk::Output: 'static,
                K: OutputKind<Tk::Output>,
            {
                builder.depends_on(self)
            }
        }
    )+};
}

deps_handle! {
    TaskHandle<T> => |this| this;
    &TaskHandle<T> => |this| this;
    (TaskHandle<T>,) => |this| &this.0;
    (&TaskHandle<T>,) => |this| this.0;
}

impl<U: Task, KU: OutputKind<U::Output>> sealed::Sealed for &DurableTask<'_, U, KU> where
    U::Output: 'static
{
}
impl<U: Task, KU: OutputKind<U::Output>> sealed::Sealed for (&DurableTask<'_, U, KU>,) where
    U::Output: 'static
{
}

impl<U, KU> Deps<U::Output> for &DurableTask<'_, U, KU>
where
    U: Task<Input = ()>,
    U::Output: Clone + Send + Sync + 'static,
    KU: OutputKind<U::Output>,
{
    fn slots(&self, _: &DagRunner, _: &RunState) -> Vec<Option<Arc<Slot>>> {
        vec![Some(Arc::clone(&self.slot))]
    }
    fn attach<'a, Tk, K>(
        self,
        builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
    ) -> TaskHandle<Tk::Output>
    where
        Tk: Task<Input = U::Output>,
        Tk::Output: 'static,
        K: OutputKind<Tk::Output>,
    {
        builder.depends_on(&self.builder)
    }
}

impl<U, KU> Deps<U::Output> for (&DurableTask<'_, U, KU>,)
where
    U: Task<Input = ()>,
    U::Output: Clone + Send + Sync + 'static,
    KU: OutputKind<U::Output>,
{
    fn slots(&self, _: &DagRunner, _: &RunState) -> Vec<Option<Arc<Slot>>> {
        vec![Some(Arc::clone(&self.0.slot))]
    }
    fn attach<'a, Tk, K>(
        self,
        builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
    ) -> TaskHandle<Tk::Output>
    where
        Tk: Task<Input = U::Output>,
        Tk::Output: 'static,
        K: OutputKind<Tk::Output>,
    {
        builder.depends_on((&self.0.builder,))
    }
}

/// `Deps` for tuples of 2 to 8 handles, and of 2 to 8 tasks without inputs.
macro_rules! deps_tuple {
    ($($T:ident $U:ident $K:ident $v:ident),+) => {
        impl<$($T),+> sealed::Sealed for ($(&TaskHandle<$T>,)+) {}

        impl<$($T: Clone + Send + Sync + 'static),+> Deps<($($T,)+)> for ($(&TaskHandle<$T>,)+) {
            fn slots(&self, dag: &DagRunner, run: &RunState) -> Vec<Option<Arc<Slot>>> {
                let ($($v,)+) = self;
                vec![$(slot_of(dag, run, $v)),+]
            }
            fn attach<'a, Tk, K>(
                self,
                builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
            ) -> TaskHandle<Tk::Output>
            where
                Tk: Task<Input = ($($T,)+)>,
                Tk::Output: 'static,
                K: OutputKind<Tk::Output>,
            {
                builder.depends_on(self)
            }
        }

        impl<$($U: Task, $K: OutputKind<$U::Output>),+> sealed::Sealed for ($(&DurableTask<'_, $U, $K>,)+)
        where
            $($U::Output: 'static,)+
        {
        }

        impl<$($U, $K),+> Deps<($($U::Output,)+)> for ($(&DurableTask<'_, $U, $K>,)+)
        where
            $($U: Task<Input = ()>, $U::Output: Clone + Send + Sync + 'static, $K: OutputKind<$U::Output>,)+
        {
            fn slots(&self, _: &DagRunner, _: &RunState) -> Vec<Option<Arc<Slot>>> {
                let ($($v,)+) = self;
                vec![$(Some(Arc::clone(&$v.slot))),+]
            }
            fn attach<'a, Tk, K>(
                self,
                builder: TaskBuilder<'a, Durable<Tk, K>, Pending>,
            ) -> TaskHandle<Tk::Output>
            where
                Tk: Task<Input = ($($U::Output,)+)>,
                Tk::Output: 'static,
                K: OutputKind<Tk::Output>,
            {
                let ($($v,)+) = self;
                builder.depends_on(($(&$v.builder,)+))
            }
        }
    };
}

deps_tuple!(A UA KA a, B UB KB b);
deps_tuple!(A UA KA a, B UB KB b, C UC KC c);
deps_tuple!(A UA KA a, B UB KB b, C UC KC c, D UD KD d);
deps_tuple!(A UA KA a, B UB KB b, C UC KC c, D UD KD d, E UE KE e);
deps_tuple!(A UA KA a, B UB KB b, C UC KC c, D UD KD d, E UE KE e, F UF KF f);
deps_tuple!(A UA KA a, B UB KB b, C UC KC c, D UD KD d, E UE KE e, F UF KF f, G UG KG g);
deps_tuple!(A UA KA a, B UB KB b, C UC KC c, D UD KD d, E UE KE e, F UF KF f, G UG KG g, H UH KH h);
