//! Live changes of a running device's image: [`crate::Device::quiesce`] pauses every queue
//! (each stops consuming its ring, completes and answers everything consumed, flushes and
//! barriers included), runs an operation on the image with nothing in flight, and may switch
//! the device to a new image (a live snapshot's overlay) before the queues resume.
//!
//! The switch is two-phase, so that it happens on every queue or on none: each paused queue
//! first builds an image queue over the new image ([`Switch::image`]); once all have,
//! [`Switch::commit`] runs (it makes the change durable, e.g. the toolstack's `params`
//! node); only then do the queues serve the new image. If a queue cannot prepare or the
//! commit fails, [`Switch::rollback`] runs, the queues go on with the old image and the
//! error is returned. Requests are never lost or reordered: those consumed before the pause
//! complete against the old image, those consumed after it against the new one, and a flush
//! is answered only once the writes consumed before it have completed (on the old image if
//! they were consumed before the pause).

use std::sync::Arc;

use xdisk_image::Image;

use crate::error::Result;

/// A new image for a device, prepared by a [`QuiesceFn`].
pub struct Switch {
    /// The image to serve from now on.
    pub image: Arc<Image>,
    /// Runs once every queue is ready to serve `image`, before any does: an error aborts the
    /// switch (then `rollback` runs).
    pub commit: Box<dyn FnOnce() -> Result<()> + Send>,
    /// Runs when the switch is abandoned (a queue could not prepare, or `commit` failed).
    pub rollback: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("image", &self.image)
            .finish()
    }
}

/// An operation run on a device's current image while its queues are paused (see
/// [`crate::Device::quiesce`]); it may return a [`Switch`] to a new image.
pub type QuiesceFn = Box<dyn FnOnce(&Arc<Image>) -> Result<Option<Switch>> + Send>;
