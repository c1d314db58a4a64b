//! The only module that calls librados and librbd (C API, `rados/librados.h` and
//! `rbd/librbd.h` from Debian's librbd-dev, Ceph 16): the few functions xdisk uses, declared
//! by hand, behind safe types.
//!
//! Ownership rules that make the wrappers safe:
//! - [`Cluster`], [`IoCtx`] and [`Image`] own their handles and release them on drop, in
//!   order: an image holds its I/O context, which holds its cluster connection.
//! - An asynchronous operation owns everything librbd may touch until its completion: the
//!   data buffer ([`Held`]: an [`IoSlice`], whose memory its creator keeps alive and
//!   unaliased until it is handed back, see [`IoBuf`]'s contract, or a bounce buffer of our
//!   own) and the iovec array passed to librbd (librbd keeps the array's pointer, not a
//!   copy, until the read completes). Both live in a heap [`Pending`] whose pointer is the
//!   completion's callback argument; librbd calls the callback exactly once, on one of its
//!   own threads, and the callback hands the buffer back through a [`Sink`]. An operation
//!   refused at submission never gets a callback: then the submitter takes the `Pending`
//!   back at once. A caller that gives up waiting (a request past its deadline) either keeps
//!   its memory out of librbd's reach by handing it a bounce buffer, which only the callback
//!   frees, whenever librbd is done with it, however late; or lends its memory (an
//!   [`IoSlice`] that is [`IoBuf::lendable`]) and keeps it until the callback hands it back.
//! - An [`Image`] counts its operations in flight; dropped while some are (given up on),
//!   it is closed by a thread of its own once the last one completes, never under librbd.
//! - The callbacks (completions, `rbd_diff_iterate2`) never unwind into
//!   C: they only lock (poison-tolerant), push and signal.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xdisk_io::{IoBuf, IoSlice};

#[allow(non_camel_case_types)]
type rados_t = *mut c_void;
#[allow(non_camel_case_types)]
type rados_ioctx_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_image_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_completion_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_callback_t = extern "C" fn(rbd_completion_t, *mut c_void);
#[allow(non_camel_case_types)]
type diff_callback_t = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `rbd_image_info_t` (librbd.h).
#[repr(C)]
struct RbdImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

/// `rbd_linked_image_spec_t` (librbd.h).
#[repr(C)]
struct RbdLinkedImageSpec {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

/// `rbd_snap_spec_t` (librbd.h).
#[repr(C)]
struct RbdSnapSpec {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

#[link(name = "rados")]
extern "C" {
    fn rados_create2(
        pcluster: *mut rados_t,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    fn rados_connect(cluster: rados_t) -> c_int;
    fn rados_shutdown(cluster: rados_t);
    fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    fn rados_ioctx_destroy(io: rados_ioctx_t);
    fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
}

#[allow(non_camel_case_types)]
type rbd_image_options_t = *mut c_void;
#[allow(non_camel_case_types)]
type rbd_update_callback_t = extern "C" fn(*mut c_void);

/// `rbd_image_option_t` values (librbd.h).
const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
const RBD_IMAGE_OPTION_ORDER: c_int = 2;
const RBD_IMAGE_OPTION_STRIPE_UNIT: c_int = 3;
const RBD_IMAGE_OPTION_STRIPE_COUNT: c_int = 4;
const RBD_IMAGE_OPTION_DATA_POOL: c_int = 10;
/// `RBD_LOCK_MODE_EXCLUSIVE` (librbd.h).
const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

/// `rbd_encryption_format_t` (librbd.h): `RBD_ENCRYPTION_FORMAT_LUKS1`, `_LUKS2`.
const RBD_ENCRYPTION_FORMAT_LUKS1: c_int = 0;
const RBD_ENCRYPTION_FORMAT_LUKS2: c_int = 1;
/// `rbd_encryption_algorithm_t` (librbd.h): `RBD_ENCRYPTION_ALGORITHM_AES128`, `_AES256`.
const RBD_ENCRYPTION_ALGORITHM_AES128: c_int = 0;
const RBD_ENCRYPTION_ALGORITHM_AES256: c_int = 1;

/// `rbd_encryption_luks1_format_options_t` and `rbd_encryption_luks2_format_options_t`
/// (librbd.h: the same layout; librbd 16 reads `alg` when formatting only, the passphrase
/// always).
#[repr(C)]
struct RbdEncryptionLuksOptions {
    alg: c_int,
    passphrase: *const c_char,
    passphrase_size: usize,
}

/// librbd's LUKS versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Luks {
    V1,
    V2,
}

/// The ciphers librbd formats with (AES in XTS mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aes {
    Aes128,
    Aes256,
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_create(io: rados_ioctx_t, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    fn rbd_image_options_destroy(opts: rbd_image_options_t);
    fn rbd_image_options_set_string(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: *const c_char,
    ) -> c_int;
    fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;
    fn rbd_update_watch(
        image: rbd_image_t,
        handle: *mut u64,
        watch_cb: rbd_update_callback_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rbd_update_unwatch(image: rbd_image_t, handle: u64) -> c_int;
    fn rbd_lock_acquire(image: rbd_image_t, lock_mode: c_int) -> c_int;
    fn rbd_encryption_format(
        image: rbd_image_t,
        format: c_int,
        opts: *mut c_void,
        opts_size: usize,
    ) -> c_int;
    fn rbd_encryption_load(
        image: rbd_image_t,
        format: c_int,
        opts: *mut c_void,
        opts_size: usize,
    ) -> c_int;
    fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    fn rbd_close(image: rbd_image_t) -> c_int;
    fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    fn rbd_stat(image: rbd_image_t, info: *mut RbdImageInfo, infosize: usize) -> c_int;
    fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    fn rbd_get_flags(image: rbd_image_t, flags: *mut u64) -> c_int;
    fn rbd_get_parent(
        image: rbd_image_t,
        parent_image: *mut RbdLinkedImageSpec,
        parent_snap: *mut RbdSnapSpec,
    ) -> c_int;
    fn rbd_linked_image_spec_cleanup(image: *mut RbdLinkedImageSpec);
    fn rbd_snap_spec_cleanup(snap: *mut RbdSnapSpec);
    fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    fn rbd_read2(
        image: rbd_image_t,
        ofs: u64,
        len: usize,
        buf: *mut c_char,
        op_flags: c_int,
    ) -> isize;
    fn rbd_write2(
        image: rbd_image_t,
        ofs: u64,
        len: usize,
        buf: *const c_char,
        op_flags: c_int,
    ) -> isize;
    fn rbd_discard(image: rbd_image_t, ofs: u64, len: u64) -> c_int;
    fn rbd_write_zeroes(
        image: rbd_image_t,
        ofs: u64,
        len: usize,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> isize;
    fn rbd_flush(image: rbd_image_t) -> c_int;
    fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: diff_callback_t,
        arg: *mut c_void,
    ) -> c_int;
    fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    fn rbd_aio_release(c: rbd_completion_t);
    fn rbd_aio_readv(
        image: rbd_image_t,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}

/// A negative errno from librados/librbd as an `io::Error`.
fn errno(r: i64) -> io::Error {
    io::Error::from_raw_os_error(i32::try_from(-r).unwrap_or(libc::EIO))
}

fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        Err(errno(r.into()))
    } else {
        Ok(())
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

/// librbd's version (major, minor, extra): 1.16 is Ceph 16.
pub(crate) fn librbd_version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: rbd_version writes three ints through valid pointers to our locals.
    unsafe { rbd_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

/// A connection to a Ceph cluster (`rados_t`).
pub(crate) struct Cluster {
    handle: rados_t,
    connected: bool,
}

// SAFETY: librados cluster handles are thread-safe once connected (QEMU and librbd itself
// use one from many threads); before `connect` only the creating thread configures it
// (`&mut self` methods).
unsafe impl Send for Cluster {}
// SAFETY: as above: every `&self` method is a call librados allows concurrently.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// A handle for Ceph user `client.USER`, not yet configured or connected.
    pub(crate) fn create(user: &str) -> io::Result<Cluster> {
        let cluster = cstring("ceph")?;
        let name = cstring(&format!("client.{user}"))?;
        let mut handle: rados_t = ptr::null_mut();
        // SAFETY: valid NUL-terminated strings and an out pointer to our local.
        check(unsafe { rados_create2(&mut handle, cluster.as_ptr(), name.as_ptr(), 0) })?;
        Ok(Cluster {
            handle,
            connected: false,
        })
    }

    /// Reads a ceph.conf (`None`: Ceph's default search path).
    pub(crate) fn read_conf(&mut self, path: Option<&str>) -> io::Result<()> {
        let path = path.map(cstring).transpose()?;
        let p = path.as_ref().map_or(ptr::null(), |p| p.as_ptr());
        // SAFETY: the handle is ours and not connected; p is NULL or a valid string.
        check(unsafe { rados_conf_read_file(self.handle, p) })
    }

    /// Sets a Ceph option.
    pub(crate) fn set(&mut self, key: &str, value: &str) -> io::Result<()> {
        let (k, v) = (cstring(key)?, cstring(value)?);
        // SAFETY: the handle is ours and not connected; both strings are valid.
        check(unsafe { rados_conf_set(self.handle, k.as_ptr(), v.as_ptr()) })
    }

    /// A Ceph option's current value.
    pub(crate) fn get(&self, key: &str) -> io::Result<String> {
        let k = cstring(key)?;
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is valid for buf.len() bytes; librados writes a NUL-terminated string
        // of at most that many bytes (or fails with -ENAMETOOLONG).
        check(unsafe {
            rados_conf_get(self.handle, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Connects (blocks up to `client_mount_timeout`).
    pub(crate) fn connect(&mut self) -> io::Result<()> {
        // SAFETY: the handle is ours, configured, not connected yet.
        check(unsafe { rados_connect(self.handle) })?;
        self.connected = true;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is ours; every I/O context (which holds an Arc of the cluster)
        // is gone. rados_shutdown also frees a handle that never connected.
        unsafe { rados_shutdown(self.handle) };
    }
}

/// An I/O context: one pool (and namespace) of a cluster.
pub(crate) struct IoCtx {
    handle: rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: a librados I/O context may be used from several threads for I/O; its namespace
// is set once, before it is shared.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        pool: &str,
        namespace: Option<&str>,
    ) -> io::Result<IoCtx> {
        if !cluster.connected {
            return Err(io::Error::other("the cluster is not connected"));
        }
        let p = cstring(pool)?;
        let ns = namespace.map(cstring).transpose()?;
        let mut handle: rados_ioctx_t = ptr::null_mut();
        // SAFETY: a connected cluster handle, a valid string and an out pointer to a local.
        check(unsafe { rados_ioctx_create(cluster.handle, p.as_ptr(), &mut handle) })?;
        if let Some(ns) = &ns {
            // SAFETY: the context was just created and is not shared yet; valid string.
            unsafe { rados_ioctx_set_namespace(handle, ns.as_ptr()) };
        }
        Ok(IoCtx {
            handle,
            _cluster: cluster,
        })
    }

    /// Creates an RBD image of `size` bytes with the cluster's default features and order.
    pub(crate) fn create_image(&self, name: &str, size: u64) -> io::Result<()> {
        let n = cstring(name)?;
        let mut order: c_int = 0;
        // SAFETY: valid context and string; order is an in/out pointer to a local (0: the
        // default object size).
        check(unsafe { rbd_create(self.handle, n.as_ptr(), size, &mut order) })
    }

    /// Creates an RBD image of `size` bytes with the options given (the cluster's defaults
    /// for the others): `rbd_create4`.
    pub(crate) fn create_image_with(
        &self,
        name: &str,
        size: u64,
        opts: &CreateImageOptions,
    ) -> io::Result<()> {
        let n = cstring(name)?;
        let data_pool = opts.data_pool.as_deref().map(cstring).transpose()?;
        let mut o: rbd_image_options_t = ptr::null_mut();
        // SAFETY: an out pointer to a local; the options are destroyed below, once.
        unsafe { rbd_image_options_create(&mut o) };
        let set = || -> io::Result<()> {
            let u64s = [
                (RBD_IMAGE_OPTION_ORDER, opts.order.map(u64::from)),
                (RBD_IMAGE_OPTION_FEATURES, opts.features),
                (RBD_IMAGE_OPTION_STRIPE_UNIT, opts.stripe_unit),
                (RBD_IMAGE_OPTION_STRIPE_COUNT, opts.stripe_count),
            ];
            for (k, v) in u64s {
                if let Some(v) = v {
                    // SAFETY: options created above; a known option of type uint64.
                    check(unsafe { rbd_image_options_set_uint64(o, k, v) })?;
                }
            }
            if let Some(p) = &data_pool {
                // SAFETY: options created above; a valid string (librbd copies it).
                check(unsafe {
                    rbd_image_options_set_string(o, RBD_IMAGE_OPTION_DATA_POOL, p.as_ptr())
                })?;
            }
            // SAFETY: a valid context, string and options.
            check(unsafe { rbd_create4(self.handle, n.as_ptr(), size, o) })
        };
        let r = set();
        // SAFETY: created above and not used after.
        unsafe { rbd_image_options_destroy(o) };
        r
    }

    /// Removes an RBD image (it must have no snapshots and no watchers).
    pub(crate) fn remove_image(&self, name: &str) -> io::Result<()> {
        let n = cstring(name)?;
        // SAFETY: valid context and string.
        check(unsafe { rbd_remove(self.handle, n.as_ptr()) })
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the handle is ours; every image opened on it (which holds an Arc of this
        // context) is closed.
        unsafe { rados_ioctx_destroy(self.handle) };
    }
}

/// What `rbd_create4` is told (`None`: the cluster's default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CreateImageOptions {
    /// log2 of the object size.
    pub(crate) order: Option<u8>,
    /// `RBD_FEATURE_*` bits.
    pub(crate) features: Option<u64>,
    pub(crate) stripe_unit: Option<u64>,
    pub(crate) stripe_count: Option<u64>,
    pub(crate) data_pool: Option<String>,
}

/// An open RBD image (`rbd_image_t`).
pub(crate) struct Image {
    handle: rbd_image_t,
    io: Arc<IoCtx>,
    /// Asynchronous operations started and not yet called back.
    outstanding: Arc<AtomicUsize>,
    /// The update watch, if registered: its handle and the callback's argument (a leaked
    /// `Box<Arc<dyn Wake>>`, taken back after `rbd_update_unwatch`).
    watch: Mutex<Option<(u64, usize)>>,
}

/// The update watch's callback: on one of librbd's threads, whenever the image's header
/// changed (a resize elsewhere, a snapshot...). Only hands over: `Wake::wake` must not block.
extern "C" fn updated(arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Arc<dyn Wake>> leaked by `Image::watch_updates`, which is
    // freed only after rbd_update_unwatch has returned (no callback runs after that).
    let target = unsafe { &*(arg as *const Arc<dyn crate::deadline::Wake>) };
    target.wake();
}

// SAFETY: librbd image handles are thread-safe: QEMU and rbd-nbd issue I/O on one handle
// from several threads; librbd serialises internally.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// What `rbd_stat` says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stat {
    pub(crate) size: u64,
    pub(crate) object_size: u64,
}

impl Image {
    /// Opens `name` (at `snapshot`); read-only opens take no watch and no lock.
    pub(crate) fn open(
        io: Arc<IoCtx>,
        name: &str,
        snapshot: Option<&str>,
        read_only: bool,
    ) -> io::Result<Image> {
        let n = cstring(name)?;
        let s = snapshot.map(cstring).transpose()?;
        let sp = s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut handle: rbd_image_t = ptr::null_mut();
        // SAFETY: a valid context, valid strings (or NULL for no snapshot) and an out
        // pointer to a local.
        let r = unsafe {
            if read_only {
                rbd_open_read_only(io.handle, n.as_ptr(), &mut handle, sp)
            } else {
                rbd_open(io.handle, n.as_ptr(), &mut handle, sp)
            }
        };
        check(r)?;
        Ok(Image {
            handle,
            io,
            outstanding: Arc::new(AtomicUsize::new(0)),
            watch: Mutex::new(None),
        })
    }

    /// Registers `target` to be woken (on librbd's threads) whenever librbd learns that the
    /// image's header changed (`rbd_update_watch`).
    pub(crate) fn watch_updates(&self, target: Arc<dyn crate::deadline::Wake>) -> io::Result<()> {
        let arg = Box::into_raw(Box::new(target));
        let mut handle = 0u64;
        // SAFETY: an open image, our callback, and an argument that lives until the watch
        // is unregistered (see `unwatch`).
        let r = unsafe { rbd_update_watch(self.handle, &mut handle, updated, arg.cast()) };
        if r < 0 {
            // SAFETY: not registered: ours to take back.
            drop(unsafe { Box::from_raw(arg) });
            return Err(errno(r.into()));
        }
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some((handle, arg as usize));
        Ok(())
    }

    /// Unregisters the update watch, if any, then frees its callback's argument.
    fn unwatch(&self) {
        let w = self.watch.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((handle, arg)) = w {
            // SAFETY: an open image and the handle librbd gave; when this returns no
            // callback runs any more (librbd waits for one in progress).
            let r = unsafe { rbd_update_unwatch(self.handle, handle) };
            if r < 0 {
                // Still registered: the argument must outlive the image. Leak it.
                tracing::warn!("rbd_update_unwatch: {}", errno(r.into()));
                return;
            }
            // SAFETY: the Box leaked by watch_updates, no longer reachable by librbd.
            drop(unsafe { Box::from_raw(arg as *mut Arc<dyn crate::deadline::Wake>) });
        }
    }

    /// Asynchronous operations started and not yet called back.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    pub(crate) fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image and an out pointer to a local.
        check(unsafe { rbd_get_size(self.handle, &mut size) })?;
        Ok(size)
    }

    pub(crate) fn stat(&self) -> io::Result<Stat> {
        // SAFETY: all-zero bytes are a valid RbdImageInfo (integers and char arrays).
        let mut info: RbdImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: an open image and a pointer to a struct of the size we pass.
        check(unsafe { rbd_stat(self.handle, &mut info, std::mem::size_of::<RbdImageInfo>()) })?;
        Ok(Stat {
            size: info.size,
            object_size: info.obj_size,
        })
    }

    pub(crate) fn features(&self) -> io::Result<u64> {
        let mut f = 0u64;
        // SAFETY: an open image and an out pointer to a local.
        check(unsafe { rbd_get_features(self.handle, &mut f) })?;
        Ok(f)
    }

    pub(crate) fn flags(&self) -> io::Result<u64> {
        let mut f = 0u64;
        // SAFETY: an open image and an out pointer to a local.
        check(unsafe { rbd_get_flags(self.handle, &mut f) })?;
        Ok(f)
    }

    /// Whether the image is a clone (has a parent).
    pub(crate) fn has_parent(&self) -> io::Result<bool> {
        // SAFETY: all-zero bytes are valid for both structs (integers, NULL pointers, false).
        let mut img: RbdLinkedImageSpec = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut snap: RbdSnapSpec = unsafe { std::mem::zeroed() };
        // SAFETY: an open image and pointers to our locals; on success librbd fills them
        // with strings it allocated, which the cleanup calls free.
        let r = unsafe { rbd_get_parent(self.handle, &mut img, &mut snap) };
        if r == -libc::ENOENT {
            return Ok(false);
        }
        check(r)?;
        // SAFETY: filled by the successful call above; freed once.
        unsafe {
            rbd_linked_image_spec_cleanup(&mut img);
            rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(true)
    }

    /// Takes the exclusive lock and keeps it: librbd no longer hands it over to other
    /// clients that ask (their writes fail) until the image is closed.
    pub(crate) fn lock_exclusive(&self) -> io::Result<()> {
        // SAFETY: an open image.
        check(unsafe { rbd_lock_acquire(self.handle, RBD_LOCK_MODE_EXCLUSIVE) })
    }

    /// Whether this handle holds the exclusive lock now.
    pub(crate) fn is_lock_owner(&self) -> io::Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: an open image and an out pointer to a local.
        check(unsafe { rbd_is_exclusive_lock_owner(self.handle, &mut owner) })?;
        Ok(owner != 0)
    }

    /// `rbd_snap_create`: a snapshot of the image as it is now.
    pub(crate) fn snap_create(&self, name: &str) -> io::Result<()> {
        let name = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a snapshot name"))?;
        // SAFETY: an open image and a NUL-terminated string that outlives the call.
        check(unsafe { rbd_snap_create(self.handle, name.as_ptr()) })
    }

    /// `rbd_encryption_format`: writes a LUKS header with `passphrase` at the start of the
    /// image (which must be larger than the header) and loads it: from then on this handle
    /// reads and writes plaintext, and its size is the image's less the header.
    pub(crate) fn encryption_format(
        &self,
        luks: Luks,
        alg: Aes,
        passphrase: &[u8],
    ) -> io::Result<()> {
        let alg = match alg {
            Aes::Aes128 => RBD_ENCRYPTION_ALGORITHM_AES128,
            Aes::Aes256 => RBD_ENCRYPTION_ALGORITHM_AES256,
        };
        self.encryption(luks, alg, passphrase, true)
    }

    /// `rbd_encryption_load`: opens the image's LUKS header with `passphrase` (EPERM: a
    /// wrong passphrase; EINVAL: no header of that version); from then on this handle reads
    /// and writes plaintext.
    pub(crate) fn encryption_load(&self, luks: Luks, passphrase: &[u8]) -> io::Result<()> {
        self.encryption(luks, RBD_ENCRYPTION_ALGORITHM_AES256, passphrase, false)
    }

    fn encryption(
        &self,
        luks: Luks,
        alg: c_int,
        passphrase: &[u8],
        format: bool,
    ) -> io::Result<()> {
        let fmt = match luks {
            Luks::V1 => RBD_ENCRYPTION_FORMAT_LUKS1,
            Luks::V2 => RBD_ENCRYPTION_FORMAT_LUKS2,
        };
        let mut opts = RbdEncryptionLuksOptions {
            alg,
            passphrase: passphrase.as_ptr().cast(),
            passphrase_size: passphrase.len(),
        };
        let p: *mut c_void = (&mut opts as *mut RbdEncryptionLuksOptions).cast();
        let size = std::mem::size_of::<RbdEncryptionLuksOptions>();
        // SAFETY: an open image; `opts` is a struct of the layout librbd.h gives for both
        // LUKS versions, of the size passed, whose passphrase pointer is valid for
        // `passphrase_size` bytes (not NUL-terminated: librbd takes the length) for the
        // whole blocking call; librbd copies what it keeps.
        check(unsafe {
            if format {
                rbd_encryption_format(self.handle, fmt, p, size)
            } else {
                rbd_encryption_load(self.handle, fmt, p, size)
            }
        })
    }

    pub(crate) fn resize(&self, size: u64) -> io::Result<()> {
        // SAFETY: an open image.
        check(unsafe { rbd_resize(self.handle, size) })
    }

    /// Reads `buf.len()` bytes at `off` (blocking); returns the bytes read (short at the
    /// end of the image).
    pub(crate) fn read(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes for the whole (blocking) call.
        let r = unsafe { rbd_read2(self.handle, off, buf.len(), buf.as_mut_ptr().cast(), 0) };
        if r < 0 {
            return Err(errno(r as i64));
        }
        Ok(r as usize)
    }

    /// Writes `buf` at `off` (blocking); returns the bytes written.
    pub(crate) fn write(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        // SAFETY: buf is valid for reads of buf.len() bytes for the whole (blocking) call;
        // librbd copies what it keeps.
        let r = unsafe { rbd_write2(self.handle, off, buf.len(), buf.as_ptr().cast(), 0) };
        if r < 0 {
            return Err(errno(r as i64));
        }
        Ok(r as usize)
    }

    pub(crate) fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: an open image.
        check(unsafe { rbd_discard(self.handle, off, len) })
    }

    pub(crate) fn write_zeroes(&self, off: u64, len: usize) -> io::Result<()> {
        // SAFETY: an open image; no buffer.
        let r = unsafe { rbd_write_zeroes(self.handle, off, len, 0, 0) };
        if r < 0 {
            return Err(errno(r as i64));
        }
        Ok(())
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        // SAFETY: an open image.
        check(unsafe { rbd_flush(self.handle) })
    }

    /// The allocated extents (`rbd_diff_iterate2` from the beginning of time, including the
    /// parent, whole objects) of `[off, off + len)`, in order; `visit` returns false to stop.
    pub(crate) fn allocated(
        &self,
        off: u64,
        len: u64,
        visit: &mut (dyn FnMut(u64, u64) -> bool + Send),
    ) -> io::Result<()> {
        /// Returned by the callback to stop the iteration (any negative value does; QEMU
        /// uses the same one).
        const STOP: c_int = -9000;
        struct State<'a> {
            visit: &'a mut (dyn FnMut(u64, u64) -> bool + Send),
        }
        extern "C" fn cb(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: arg is the Mutex<State> on the stack of `allocated`, which outlives
            // the rbd_diff_iterate2 call that invokes us (librbd may call from its own
            // threads, one at a time; the mutex makes that sound in any case).
            let state = unsafe { &*(arg as *const Mutex<State<'_>>) };
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            if exists == 0 {
                return 0;
            }
            if (st.visit)(off, len as u64) {
                0
            } else {
                STOP
            }
        }
        let state = Mutex::new(State { visit });
        // SAFETY: an open image; the callback and its argument are valid for the call,
        // which returns only after the last callback.
        let r = unsafe {
            rbd_diff_iterate2(
                self.handle,
                ptr::null(),
                off,
                len,
                1,
                1,
                cb,
                &state as *const Mutex<State<'_>> as *mut c_void,
            )
        };
        if r < 0 && r != STOP {
            return Err(errno(r.into()));
        }
        Ok(())
    }

    /// Starts an asynchronous operation; on success `sink` gets `(tag, result, buffer)`
    /// exactly once, from one of librbd's threads (`result`: librbd's return value, a
    /// negative errno on failure). On failure the buffer comes back at once.
    // `Held` is as large as an `IoSlice` (its iovecs inline): see there.
    #[allow(clippy::result_large_err)]
    pub(crate) fn aio(
        &self,
        op: AioOp,
        sink: Arc<dyn Sink>,
        tag: u64,
    ) -> Result<(), (Held, io::Error)> {
        let mut pending = Box::new(Pending {
            sink,
            tag,
            held: Held::Nothing,
            iov: Vec::new(),
            outstanding: self.outstanding.clone(),
        });
        let (kind, off, len) = match op {
            AioOp::Read { buf, len, off } => {
                pending.hold(buf, len);
                (Kind::Read, off, len as u64)
            }
            AioOp::Write { buf, len, off } => {
                pending.hold(buf, len);
                (Kind::Write, off, len as u64)
            }
            AioOp::Flush => (Kind::Flush, 0, 0),
            AioOp::Discard { off, len } => (Kind::Discard, off, len),
            AioOp::WriteZeroes { off, len } => (Kind::WriteZeroes, off, len),
        };
        let Ok(iovcnt) = c_int::try_from(pending.iov.len()) else {
            return Err((
                std::mem::replace(&mut pending.held, Held::Nothing),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        let Ok(zero_len) = usize::try_from(len) else {
            return Err((
                std::mem::replace(&mut pending.held, Held::Nothing),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        // The heap array stays where it is when the box becomes a raw pointer.
        let iov = pending.iov.as_ptr();
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let arg = Box::into_raw(pending);
        let mut c: rbd_completion_t = ptr::null_mut();
        // SAFETY: `arg` is a valid pointer that the completion's callback takes back; the
        // callback cannot run before an operation is started on the completion.
        let r = unsafe { rbd_aio_create_completion(arg.cast(), complete, &mut c) };
        if r < 0 {
            // SAFETY: no completion exists: we still own `arg`.
            let p = unsafe { Box::from_raw(arg) };
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err((p.held, errno(r.into())));
        }
        // SAFETY: an open image and a fresh completion. The iovecs (and the memory they
        // describe: the IoSlice's, valid and unaliased until handed back by its contract,
        // or the bounce buffer's, which the Pending owns) live in the Pending that only the
        // callback frees, after librbd is done with them.
        // After a successful call `arg` is not touched here again (the callback may
        // already have freed it).
        let r = unsafe {
            match kind {
                Kind::Read => rbd_aio_readv(self.handle, iov, iovcnt, off, c),
                Kind::Write => rbd_aio_writev(self.handle, iov, iovcnt, off, c),
                Kind::Flush => rbd_aio_flush(self.handle, c),
                Kind::Discard => rbd_aio_discard(self.handle, off, len, c),
                Kind::WriteZeroes => rbd_aio_write_zeroes(self.handle, off, zero_len, c, 0, 0),
            }
        };
        if r < 0 {
            // Refused before it started: librbd never calls back for this completion.
            // SAFETY: the completion is ours to release, and `arg` ours to take back.
            let p = unsafe {
                rbd_aio_release(c);
                Box::from_raw(arg)
            };
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err((p.held, errno(r.into())));
        }
        Ok(())
    }
}

/// The memory of an operation while librbd has it.
// An `IoSlice` keeps up to 32 iovecs inline (no allocation per request); boxing it here would
// bring back the allocation it avoids, for a value that lives in one in-flight slot.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Held {
    /// No data (flush, discard, write zeroes), or nothing handed back.
    Nothing,
    /// The caller's memory as is (zero copy): for callers that wait for the completion,
    /// however long it takes, or that lend it (keep it until the completion, however late,
    /// even if they stopped waiting).
    Slice(IoSlice),
    /// A buffer of our own (the data to write, copied; or room for the data read): the
    /// caller may give up on the operation, the buffer stays with librbd until it is done.
    Bounce(Vec<u8>),
}

/// An asynchronous operation for [`Image::aio`].
pub(crate) enum AioOp {
    /// `rbd_aio_readv` of the first `len` bytes of `buf`.
    Read { buf: Held, len: usize, off: u64 },
    /// `rbd_aio_writev` of the first `len` bytes of `buf`.
    Write { buf: Held, len: usize, off: u64 },
    /// `rbd_aio_flush`.
    Flush,
    /// `rbd_aio_discard`.
    Discard { off: u64, len: u64 },
    /// `rbd_aio_write_zeroes` (may unmap: no thick provisioning).
    WriteZeroes { off: u64, len: u64 },
}

#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// Where completions go. Called on librbd's threads: must not block for long or panic.
pub(crate) trait Sink: Send + Sync {
    /// The operation `tag` finished with librbd's return value `result`; `held` is its
    /// buffer, handed back.
    fn done(&self, tag: u64, result: i64, held: Held);
}

/// What an operation in flight owns: its buffer and the iovecs librbd reads.
struct Pending {
    sink: Arc<dyn Sink>,
    tag: u64,
    held: Held,
    iov: Vec<libc::iovec>,
    outstanding: Arc<AtomicUsize>,
}

impl Pending {
    /// Takes `held` and describes its first `len` bytes.
    fn hold(&mut self, mut held: Held, len: usize) {
        match &mut held {
            Held::Nothing => {}
            Held::Slice(buf) => {
                let mut left = len;
                for v in buf.iovecs() {
                    if left == 0 {
                        break;
                    }
                    let n = v.iov_len.min(left);
                    self.iov.push(libc::iovec {
                        iov_base: v.iov_base,
                        iov_len: n,
                    });
                    left -= n;
                }
            }
            Held::Bounce(v) => {
                // The Vec's heap memory does not move when the Vec is moved into `held`.
                self.iov.push(libc::iovec {
                    iov_base: v.as_mut_ptr().cast(),
                    iov_len: len.min(v.len()),
                });
            }
        }
        self.held = held;
    }
}

/// The completion callback of every asynchronous operation.
extern "C" fn complete(c: rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Pending> leaked by `Image::aio` for this completion, and
    // librbd calls this once per completion: we are its only owner now.
    let p = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the completion librbd completes; it is released once, here (QEMU's
    // rbd driver releases it in its callback too).
    let r = unsafe {
        let r = rbd_aio_get_return_value(c);
        rbd_aio_release(c);
        r
    };
    let Pending {
        sink,
        tag,
        held,
        iov,
        outstanding,
    } = *p;
    drop(iov);
    // Counted out before the sink hears of it: whoever learns of the completion and then
    // drops the image must find nothing in flight (else the close would wait for nothing on
    // a thread, and meanwhile this handle would keep the exclusive lock from the next open).
    outstanding.fetch_sub(1, Ordering::AcqRel);
    sink.done(tag, r as i64, held);
}

/// An image handle on its way to `rbd_close` on another thread.
struct Closing {
    handle: rbd_image_t,
    _io: Arc<IoCtx>,
    outstanding: Arc<AtomicUsize>,
}

// SAFETY: an image handle may be used from any thread (see `Image`); this one is used by the
// closing thread only.
unsafe impl Send for Closing {}

fn close(handle: rbd_image_t) {
    // SAFETY: the handle is ours, open, and no operation is in flight on it (every callback
    // has run); it is not used again.
    let r = unsafe { rbd_close(handle) };
    if r < 0 {
        tracing::warn!("closing an RBD image: {}", errno(r.into()));
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        self.unwatch();
        if self.outstanding.load(Ordering::Acquire) == 0 {
            return close(self.handle);
        }
        // Operations given up on (past their deadline) are still in librbd, which may yet
        // write into their buffers and call back: rbd_close would wait for them (forever, if
        // the cluster never answers). Close once they are done, on a thread of our own.
        let c = Closing {
            handle: self.handle,
            _io: self.io.clone(),
            outstanding: self.outstanding.clone(),
        };
        tracing::warn!(
            in_flight = c.outstanding.load(Ordering::Acquire),
            "an RBD image is closed while librbd still has requests of it: closing it when they complete"
        );
        let spawned = std::thread::Builder::new()
            .name("xdisk-rbd-close".into())
            .spawn(move || {
                let c = c;
                while c.outstanding.load(Ordering::Acquire) != 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                close(c.handle);
            });
        if let Err(e) = spawned {
            // The handle (and its I/O context) is leaked: never closed under librbd.
            tracing::error!("cannot start a thread to close an RBD image ({e}): leaking it");
            std::mem::forget(self.io.clone());
        }
    }
}
