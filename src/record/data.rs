//! What the handler leaves for its request's callbacks: [`After::insert`](crate::After::insert),
//! read back with [`AfterContext::get`](crate::AfterContext::get).

use std::any::{Any, TypeId};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use crate::unwind::drop_caught;

/// Typed values that a request's handler leaves for its callbacks and its `after_each` hook
/// ([`After::insert`](crate::After::insert), [`AfterContext::get`](crate::AfterContext::get)): one per type, like
/// `http::Extensions`. Values are shared, not cloned, so no user code runs under the lock.
#[derive(Default)]
pub(crate) struct Data {
    /// Made on the first `insert`, boxed: most requests leave nothing, and this is in every
    /// request's state. Whether it was made is read on every request's end, without a lock.
    values: OnceLock<Box<Mutex<Values>>>,
}

/// One value per type, in insertion order: a request leaves a handful at most.
#[derive(Default)]
struct Values(Vec<(TypeId, Value)>);

type Value = Arc<dyn Any + Send + Sync>;

impl Data {
    fn values(&self) -> Option<MutexGuard<'_, Values>> {
        let values = self.values.get()?;
        Some(values.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Stores `value`, and hands back the value of its type it replaces.
    pub(crate) fn insert<T: Any + Send + Sync>(&self, value: T) -> Option<Arc<T>> {
        let value: Value = Arc::new(value);
        let replaced = {
            let values = self.values.get_or_init(Box::default);
            let mut values = values.lock().unwrap_or_else(PoisonError::into_inner);
            match values.0.iter_mut().find(|(id, _)| *id == TypeId::of::<T>()) {
                Some((_, slot)) => Some(std::mem::replace(slot, value)),
                None => {
                    values.0.push((TypeId::of::<T>(), value));
                    None
                }
            }
        };
        // Dropped (if last) outside the lock: a `Drop` may call back into the crate.
        replaced.and_then(|value| value.downcast().ok())
    }

    /// Whether a value was ever left; cheap.
    pub(crate) fn is_used(&self) -> bool {
        self.values.get().is_some()
    }

    /// Lets go of every value, outside the lock; a panic in a value's `Drop` is caught.
    pub(crate) fn clear(&self) {
        let Some(values) = self.values().map(|mut values| std::mem::take(&mut *values)) else {
            return;
        };
        drop_caught(values);
    }

    pub(crate) fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let value = {
            let values = self.values()?;
            let (_, value) = values.0.iter().find(|(id, _)| *id == TypeId::of::<T>())?;
            value.clone()
        };
        value.downcast().ok()
    }
}
