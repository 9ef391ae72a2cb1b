//! Test support for the crates that run poll loops, behind the `testing` feature (lb-io's own tests
//! have it too): not part of the API.

use lb_core::Frame;

use crate::device::{Device, DeviceError, FlushProgress, Received, Span};

/// A device that receives no frame, sends none and never ends: a loop on it leaves on its stop flag
/// or on an error of its receive. It calls `.0` at each receive and returns its error: there a test
/// holds the loop until it lets it go on, fails the device, or hands the loop a frame.
pub struct NoTraffic<F>(pub F);

impl NoTraffic<fn() -> Result<(), DeviceError>> {
    /// One that does nothing at a receive.
    pub fn idle() -> Self {
        NoTraffic(|| Ok(()))
    }
}

impl<F: FnMut() -> Result<(), DeviceError>> Device for NoTraffic<F> {
    fn receive<'a>(&'a mut self, _frames: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
        (self.0)()?;
        Ok(Received::frames(0))
    }
    fn settle(&mut self, _spans: &[Option<Span>]) -> Result<usize, DeviceError> {
        Ok(0)
    }
    fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
        Ok(FlushProgress::default())
    }
    fn pending_tx(&self) -> usize {
        0
    }
    fn discard_pending(&mut self) -> usize {
        0
    }
}
