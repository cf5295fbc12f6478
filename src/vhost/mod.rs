//! vhost-user-blk: the guest's data path without a socket hop per request.
//!
//! With NBD, every guest I/O crosses QEMU's block layer, a socket and this
//! node's NBD server. With vhost-user-blk the hypervisor (QEMU,
//! cloud-hypervisor) hands the guest's memory and virtqueues to this node,
//! which reads and writes guest buffers in place. The hypervisor stays
//! stock: `-device vhost-user-blk-pci,chardev=...` is plain QEMU.
//!
//! ```text
//!   guest virtio-blk ──virtqueues in shared memory──► BlockDevice (device.rs)
//!                                                       │ parse (request.rs)
//!                                                       ▼
//!                           the volume's gated target (same as NBD's)
//! ```
//!
//! - [`request`]: pure parsing and checking of a descriptor chain (fuzzed).
//! - [`device`]: the virtio-blk device: features, config space, queues.
//! - [`export`]: one UNIX socket per volume, one frontend at a time.
//! - [`frontend`]: a small vhost-user-blk *driver* (the hypervisor's side),
//!   for benchmarks and tests; not used by the node.
//!
//! Live migration: the device supports QEMU's dirty log (`VHOST_F_LOG_ALL`,
//! `LOG_SHMFD`), so QEMU can migrate a VM whose disk is served here; the
//! disk itself moves with `dlsm migrate` as for NBD.

pub mod device;
pub mod export;
pub mod frontend;
pub mod request;

pub use device::{BlockDevice, DeviceConfig};
pub use export::VhostExports;
