//! Requests and responses on the wire (xen/io/blkif.h, "REQUEST CODES" to
//! the end of the file), parsed from and written to byte buffers with the
//! offsets of [`crate::abi::Layout`].
//!
//! Everything read here came from a guest: [`Request::parse`] validates every
//! field a backend acts upon and returns a [`RequestError`] (which still
//! carries the `id` and `operation` to answer with, and the
//! [`Status`] to answer) for anything it does not accept. It never panics.

use crate::abi::{segment, Abi, Layout, SLOT_SIZE};

/// `BLKIF_OP_READ`.
pub const BLKIF_OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const BLKIF_OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER` (optional, "feature-barrier").
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE` (optional, "feature-flush-cache").
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_RESERVED_1` (SLES device-specific packets; never accepted).
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// `BLKIF_OP_DISCARD` (optional, "feature-discard").
pub const BLKIF_OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT` (optional, "feature-max-indirect-segments").
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`: segments in a direct request.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`: grant refs in an indirect request.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// `BLKIF_DISCARD_SECURE`, the only defined bit of the discard `flag`.
pub const BLKIF_DISCARD_SECURE: u8 = 1;

/// `BLKIF_RSP_EOPNOTSUPP`.
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
/// `BLKIF_RSP_ERROR`.
pub const BLKIF_RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_OKAY`.
pub const BLKIF_RSP_OKAY: i16 = 0;

/// The page size of ring and data pages: always 4 KiB for Xen ring
/// protocols (xen/io/ring.h, `XEN_PAGE_SHIFT` 12).
pub const PAGE_SIZE: usize = 4096;
/// Sector unit of `first_sect`/`last_sect`/`sector_number`: 512 bytes (a
/// frontend without "feature-large-sector-size" hardcodes 512, blkif.h).
pub const SECTOR_SIZE: usize = 512;
/// Sectors in a page: `last_sect` must be below this (Linux blkback checks
/// `last_sect >= XEN_PAGE_SIZE >> 9`).
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE / SECTOR_SIZE) as u8;
/// Segments in one indirect page:
/// `PAGE_SIZE / sizeof(struct blkif_request_segment)` (blkif.h, at
/// `BLKIF_OP_INDIRECT`; Linux's `SEGS_PER_INDIRECT_FRAME`).
pub const SEGS_PER_INDIRECT_FRAME: usize = PAGE_SIZE / segment::SIZE;
/// The most segments an indirect request can name at all.
pub const MAX_INDIRECT_SEGMENTS_LIMIT: u16 =
    (SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST) as u16;
/// A reasonable default for "feature-max-indirect-segments" (Linux
/// blkback's `MAX_INDIRECT_SEGMENTS`).
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: u16 = 256;
/// Sector numbers must stay below this so that a byte offset
/// (`sector * 512`, plus the length) never overflows a u64.
pub const MAX_SECTORS: u64 = u64::MAX >> 9;

/// A response status (`BLKIF_RSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `BLKIF_RSP_OKAY`.
    Okay,
    /// `BLKIF_RSP_ERROR`: failed, or invalid request.
    Error,
    /// `BLKIF_RSP_EOPNOTSUPP`: operation not supported.
    EOpNotSupp,
}

impl Status {
    /// The wire value.
    pub const fn to_i16(self) -> i16 {
        match self {
            Status::Okay => BLKIF_RSP_OKAY,
            Status::Error => BLKIF_RSP_ERROR,
            Status::EOpNotSupp => BLKIF_RSP_EOPNOTSUPP,
        }
    }

    /// From the wire value; `None` for values blkif.h does not define.
    pub const fn from_i16(v: i16) -> Option<Status> {
        match v {
            BLKIF_RSP_OKAY => Some(Status::Okay),
            BLKIF_RSP_ERROR => Some(Status::Error),
            BLKIF_RSP_EOPNOTSUPP => Some(Status::EOpNotSupp),
            _ => None,
        }
    }
}

/// One `struct blkif_request_segment`: a granted 4 KiB frame and the
/// inclusive range of 512-byte sectors of it to transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Segment {
    /// Grant reference of the data frame.
    pub gref: u32,
    /// First sector in the frame (inclusive), `0..=7`.
    pub first_sect: u8,
    /// Last sector in the frame (inclusive), `first_sect..=7`.
    pub last_sect: u8,
}

impl Segment {
    /// Checks `first_sect <= last_sect < 8`.
    pub const fn is_valid(&self) -> bool {
        self.first_sect <= self.last_sect && self.last_sect < SECTORS_PER_PAGE
    }

    /// Number of sectors (0 if invalid).
    pub const fn nr_sectors(&self) -> u8 {
        if self.is_valid() {
            self.last_sect - self.first_sect + 1
        } else {
            0
        }
    }

    /// Byte offset of the first sector in the frame.
    pub const fn offset_bytes(&self) -> usize {
        self.first_sect as usize * SECTOR_SIZE
    }

    /// Length in bytes (0 if invalid).
    pub const fn len_bytes(&self) -> usize {
        self.nr_sectors() as usize * SECTOR_SIZE
    }

    fn read(buf: &[u8], off: usize) -> Segment {
        Segment {
            gref: le_u32(buf, off + segment::GREF),
            first_sect: byte(buf, off + segment::FIRST_SECT),
            last_sect: byte(buf, off + segment::LAST_SECT),
        }
    }

    fn write(&self, buf: &mut [u8], off: usize) {
        put(buf, off + segment::GREF, &self.gref.to_le_bytes());
        put(
            buf,
            off + segment::FIRST_SECT,
            &[self.first_sect, self.last_sect],
        );
        // Bytes 6..8 are padding: the caller zeroed them.
    }
}

/// The segments of a direct request: at most
/// [`BLKIF_MAX_SEGMENTS_PER_REQUEST`], stored inline.
#[derive(Clone, Copy, Default)]
pub struct Segments {
    len: u8,
    segs: [Segment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

impl Segments {
    /// An empty list.
    pub const fn new() -> Segments {
        Segments {
            len: 0,
            segs: [Segment {
                gref: 0,
                first_sect: 0,
                last_sect: 0,
            }; BLKIF_MAX_SEGMENTS_PER_REQUEST],
        }
    }

    /// From a slice; `None` if it has more than 11 segments.
    pub fn from_slice(s: &[Segment]) -> Option<Segments> {
        let mut out = Segments::new();
        for seg in s {
            out.push(*seg).ok()?;
        }
        Some(out)
    }

    /// Appends; gives the segment back when full.
    pub fn push(&mut self, seg: Segment) -> Result<(), Segment> {
        match self.segs.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = seg;
                self.len += 1;
                Ok(())
            }
            None => Err(seg),
        }
    }

    /// The segments.
    pub fn as_slice(&self) -> &[Segment] {
        self.segs.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total sectors of all segments.
    pub fn nr_sectors(&self) -> u64 {
        self.as_slice()
            .iter()
            .map(|s| u64::from(s.nr_sectors()))
            .sum()
    }
}

impl PartialEq for Segments {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}
impl Eq for Segments {}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// The grant references of an indirect request's segment pages: exactly
/// `ceil(nr_segments / 512)` of them (the rest of the 8 slots on the wire are
/// ignored).
#[derive(Clone, Copy, Default)]
pub struct IndirectGrefs {
    len: u8,
    grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
}

impl IndirectGrefs {
    /// From a slice; `None` if it has more than 8 refs.
    pub fn from_slice(s: &[u32]) -> Option<IndirectGrefs> {
        let mut out = IndirectGrefs::default();
        out.grefs.get_mut(..s.len())?.copy_from_slice(s);
        out.len = u8::try_from(s.len()).ok()?;
        Some(out)
    }

    /// The references.
    pub fn as_slice(&self) -> &[u32] {
        self.grefs.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// Number of references (pages).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl PartialEq for IndirectGrefs {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}
impl Eq for IndirectGrefs {}

impl std::fmt::Debug for IndirectGrefs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A read, write, barrier or flush: `struct blkif_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectIo {
    /// `sector_number`: first sector on the disk.
    pub sector: u64,
    /// `seg[..nr_segments]`. The sectors of consecutive segments are
    /// consecutive on the disk.
    pub segments: Segments,
}

impl DirectIo {
    /// Total sectors transferred.
    pub fn nr_sectors(&self) -> u64 {
        self.segments.nr_sectors()
    }
}

/// The data operation of an indirect request (`indirect_op`): blkif.h only
/// allows `BLKIF_OP_{READ/WRITE}` (and Linux blkback rejects anything else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndirectOp {
    /// `BLKIF_OP_READ`.
    Read,
    /// `BLKIF_OP_WRITE`.
    Write,
}

impl IndirectOp {
    /// Wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            IndirectOp::Read => BLKIF_OP_READ,
            IndirectOp::Write => BLKIF_OP_WRITE,
        }
    }
}

/// `struct blkif_request_indirect`: the segments are in separate granted
/// pages, to be mapped and read with [`Indirect::parse_segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indirect {
    /// `indirect_op`.
    pub op: IndirectOp,
    /// `sector_number`.
    pub sector: u64,
    /// `nr_segments`: `1..=max_indirect_segments`.
    pub nr_segments: u16,
    /// `indirect_grefs[..ceil(nr_segments / 512)]`.
    pub indirect_grefs: IndirectGrefs,
}

impl Indirect {
    /// How many of the `nr_segments` segments are in indirect page `page`.
    pub fn segments_in_page(&self, page: usize) -> usize {
        let n = usize::from(self.nr_segments);
        let start = page.saturating_mul(SEGS_PER_INDIRECT_FRAME);
        n.saturating_sub(start).min(SEGS_PER_INDIRECT_FRAME)
    }

    /// Reads and validates all segments from the mapped indirect pages (one
    /// per entry of `indirect_grefs`, in order), and checks that the whole
    /// sector range fits. The pages are private copies: copy each mapped
    /// indirect page out of guest memory once (`SharedMem::copy_from` into
    /// a `[u8; PAGE_SIZE]`) and parse that, never the live mapping, so the
    /// guest cannot change a segment between this check and the I/O.
    pub fn parse_segments(
        &self,
        pages: &[&[u8; PAGE_SIZE]],
    ) -> Result<Vec<Segment>, InvalidRequest> {
        let mut segs = Vec::new();
        self.parse_segments_into(pages, &mut segs)?;
        Ok(segs)
    }

    /// [`Indirect::parse_segments`] into `segs` (emptied first), so that a caller reusing
    /// its list allocates nothing per request. On error `segs` holds no valid list.
    pub fn parse_segments_into(
        &self,
        pages: &[&[u8; PAGE_SIZE]],
        segs: &mut Vec<Segment>,
    ) -> Result<(), InvalidRequest> {
        segs.clear();
        if pages.len() != self.indirect_grefs.len() {
            return Err(InvalidRequest::IndirectPageCount {
                expected: self.indirect_grefs.len(),
                got: pages.len(),
            });
        }
        segs.reserve(usize::from(self.nr_segments));
        for (i, page) in pages.iter().enumerate() {
            let base = i * SEGS_PER_INDIRECT_FRAME;
            parse_indirect_segments_into(page, self.segments_in_page(i), segs).map_err(
                |e| match e {
                    InvalidRequest::BadSegment { index, first, last } => {
                        InvalidRequest::BadSegment {
                            index: base + index,
                            first,
                            last,
                        }
                    }
                    other => other,
                },
            )?;
        }
        let total: u64 = segs.iter().map(|s| u64::from(s.nr_sectors())).sum();
        check_range(self.sector, total)
    }
}

/// The body of a request, by operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `BLKIF_OP_READ`: 1..=11 segments.
    Read(DirectIo),
    /// `BLKIF_OP_WRITE`: 1..=11 segments.
    Write(DirectIo),
    /// `BLKIF_OP_WRITE_BARRIER`: 0..=11 segments (written after all
    /// earlier writes complete, before any later one starts).
    WriteBarrier(DirectIo),
    /// `BLKIF_OP_FLUSH_DISKCACHE`: 0..=11 segments. Zero is the empty flush
    /// Linux's blkfront sends; with segments it is a write followed by a
    /// flush (Linux blkback maps it to a `REQ_PREFLUSH` write).
    Flush(DirectIo),
    /// `BLKIF_OP_DISCARD` (`struct blkif_request_discard`).
    Discard {
        /// `sector_number`.
        sector: u64,
        /// `nr_sectors`.
        nr_sectors: u64,
        /// `flag & BLKIF_DISCARD_SECURE`.
        secure: bool,
    },
    /// `BLKIF_OP_INDIRECT`.
    Indirect(Indirect),
}

/// A validated request, copied out of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `id`: private to the frontend, echoed in the response.
    pub id: u64,
    /// `handle` (the virtual device; informational).
    pub handle: u16,
    /// What to do.
    pub kind: RequestKind,
}

/// Limits the backend advertised, needed to validate requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// The "feature-max-indirect-segments" value the backend published; 0 if
    /// it did not publish the node (indirect requests are then answered
    /// `EOPNOTSUPP`). Values above [`MAX_INDIRECT_SEGMENTS_LIMIT`] are
    /// treated as that limit.
    pub max_indirect_segments: u16,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
        }
    }
}

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// An operation code blkif.h does not define (or `BLKIF_OP_RESERVED_1`).
    #[error("unknown operation {0}")]
    UnknownOperation(u8),
    /// `BLKIF_OP_INDIRECT` while the backend advertises no indirect segments.
    #[error("indirect requests are not enabled")]
    IndirectNotSupported,
    /// `indirect_op` is not READ or WRITE.
    #[error("invalid indirect operation {0}")]
    InvalidIndirectOperation(u8),
    /// A read, write or indirect request without segments.
    #[error("request without segments")]
    NoSegments,
    /// More segments than allowed.
    #[error("{nr} segments, more than the maximum {max}")]
    TooManySegments {
        /// `nr_segments`.
        nr: u32,
        /// The limit.
        max: u32,
    },
    /// A segment with `first_sect > last_sect` or `last_sect > 7`.
    #[error("segment {index}: invalid sectors {first}..={last}")]
    BadSegment {
        /// Index of the segment in the request.
        index: usize,
        /// `first_sect`.
        first: u8,
        /// `last_sect`.
        last: u8,
    },
    /// `sector_number + sectors` overflows (or leaves the byte-addressable range).
    #[error("sector range {sector} + {nr_sectors} overflows")]
    SectorOverflow {
        /// `sector_number`.
        sector: u64,
        /// Number of sectors.
        nr_sectors: u64,
    },
    /// Undefined bits in the discard `flag`.
    #[error("invalid discard flags {0:#x}")]
    InvalidDiscardFlags(u8),
    /// [`Indirect::parse_segments`] got the wrong number of pages.
    #[error("expected {expected} indirect pages, got {got}")]
    IndirectPageCount {
        /// `indirect_grefs.len()`.
        expected: usize,
        /// Pages passed.
        got: usize,
    },
}

impl InvalidRequest {
    /// The status to answer with: `EOPNOTSUPP` for operations the backend
    /// does not implement (Linux blkback's `default:` case in
    /// `dispatch_other_io`/`__do_block_io_op`), `ERROR` for malformed ones.
    pub const fn status(&self) -> Status {
        match self {
            InvalidRequest::UnknownOperation(_) | InvalidRequest::IndirectNotSupported => {
                Status::EOpNotSupp
            }
            _ => Status::Error,
        }
    }
}

/// A rejected request, with what is needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request {id:#x} (operation {operation}): {reason}")]
pub struct RequestError {
    /// The request's `id` (read at the same offset in every format).
    pub id: u64,
    /// The operation to echo: the request's `operation`, or its
    /// `indirect_op` for indirect requests (see [`Request::response_operation`]).
    pub operation: u8,
    /// Why.
    pub reason: InvalidRequest,
}

impl RequestError {
    /// The status to answer with.
    pub const fn status(&self) -> Status {
        self.reason.status()
    }

    /// The response to push for this request.
    pub const fn response(&self) -> Response {
        Response {
            id: self.id,
            operation: self.operation,
            status: self.status(),
        }
    }
}

/// A response (`struct blkif_response`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The request's `id`.
    pub id: u64,
    /// The request's operation (see [`Request::response_operation`]).
    pub operation: u8,
    /// The result.
    pub status: Status,
}

/// Errors of [`Response::write`] and [`Response::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The buffer is shorter than `sizeof(struct blkif_response)`.
    #[error("buffer of {got} bytes, need {need}")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// A status blkif.h does not define.
    #[error("unknown response status {0}")]
    UnknownStatus(i16),
}

fn byte(buf: &[u8], off: usize) -> u8 {
    buf.get(off).copied().unwrap_or(0)
}

fn le_u16(buf: &[u8], off: usize) -> u16 {
    let mut b = [0u8; 2];
    if let Some(s) = buf.get(off..off + 2) {
        b.copy_from_slice(s);
    }
    u16::from_le_bytes(b)
}

fn le_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = buf.get(off..off + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn le_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = buf.get(off..off + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    // Offsets come from the compile-time-checked layouts; `get_mut` keeps a
    // wrong one from panicking anyway.
    if let Some(d) = buf.get_mut(off..off + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

/// Checks that `sector .. sector + nr_sectors` is representable, and in bytes too.
fn check_range(sector: u64, nr_sectors: u64) -> Result<(), InvalidRequest> {
    match sector.checked_add(nr_sectors) {
        Some(end) if end <= MAX_SECTORS => Ok(()),
        _ => Err(InvalidRequest::SectorOverflow { sector, nr_sectors }),
    }
}

fn parse_direct(
    l: &Layout,
    slot: &[u8; SLOT_SIZE],
    min_segments: u8,
) -> Result<DirectIo, InvalidRequest> {
    let nr = slot[l.req_nr_segments];
    if nr < min_segments {
        return Err(InvalidRequest::NoSegments);
    }
    if usize::from(nr) > BLKIF_MAX_SEGMENTS_PER_REQUEST {
        return Err(InvalidRequest::TooManySegments {
            nr: u32::from(nr),
            max: BLKIF_MAX_SEGMENTS_PER_REQUEST as u32,
        });
    }
    let mut segments = Segments::new();
    for index in 0..usize::from(nr) {
        let seg = Segment::read(slot, l.req_seg + index * segment::SIZE);
        if !seg.is_valid() {
            return Err(InvalidRequest::BadSegment {
                index,
                first: seg.first_sect,
                last: seg.last_sect,
            });
        }
        // Cannot fail: nr <= 11 was checked above.
        let _ = segments.push(seg);
    }
    let sector = le_u64(slot, l.req_sector_number);
    // An empty flush or barrier carries no range: Linux's blkfront sends the block layer's
    // `blk_rq_pos()` of a data-less flush request, which is `(sector_t)-1`, and Linux blkback
    // checks the range only when there are sectors (`xen_vbd_translate`).
    if !segments.is_empty() {
        check_range(sector, segments.nr_sectors())?;
    }
    Ok(DirectIo { sector, segments })
}

impl Request {
    /// Parses and validates a request slot copied out of the ring, with the
    /// default [`ParseLimits`].
    pub fn parse(abi: Abi, slot: &[u8; SLOT_SIZE]) -> Result<Request, RequestError> {
        Request::parse_with(abi, slot, &ParseLimits::default())
    }

    /// Parses and validates a request slot copied out of the ring. For
    /// x86_32 only the first 108 bytes are read.
    pub fn parse_with(
        abi: Abi,
        slot: &[u8; SLOT_SIZE],
        limits: &ParseLimits,
    ) -> Result<Request, RequestError> {
        let l = abi.layout();
        let operation = slot[0];
        // Same offset in every format (checked at compile time in abi.rs).
        let id = le_u64(slot, l.req_id);
        let err = |operation: u8, reason: InvalidRequest| RequestError {
            id,
            operation,
            reason,
        };
        let (handle, kind) = match operation {
            BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER | BLKIF_OP_FLUSH_DISKCACHE => {
                let min = match operation {
                    BLKIF_OP_READ | BLKIF_OP_WRITE => 1,
                    _ => 0,
                };
                let io = parse_direct(l, slot, min).map_err(|r| err(operation, r))?;
                let kind = match operation {
                    BLKIF_OP_READ => RequestKind::Read(io),
                    BLKIF_OP_WRITE => RequestKind::Write(io),
                    BLKIF_OP_WRITE_BARRIER => RequestKind::WriteBarrier(io),
                    _ => RequestKind::Flush(io),
                };
                (le_u16(slot, l.req_handle), kind)
            }
            BLKIF_OP_DISCARD => {
                let flag = slot[l.discard_flag];
                if flag & !BLKIF_DISCARD_SECURE != 0 {
                    return Err(err(operation, InvalidRequest::InvalidDiscardFlags(flag)));
                }
                let sector = le_u64(slot, l.discard_sector_number);
                let nr_sectors = le_u64(slot, l.discard_nr_sectors);
                check_range(sector, nr_sectors).map_err(|r| err(operation, r))?;
                (
                    le_u16(slot, l.discard_handle),
                    RequestKind::Discard {
                        sector,
                        nr_sectors,
                        secure: flag & BLKIF_DISCARD_SECURE != 0,
                    },
                )
            }
            BLKIF_OP_INDIRECT => {
                let raw_op = slot[l.indirect_op];
                // Linux blkback answers indirect requests with indirect_op as
                // the operation (pending_req->operation = req_operation), and
                // Linux blkfront checks for exactly that.
                if limits.max_indirect_segments == 0 {
                    return Err(err(raw_op, InvalidRequest::IndirectNotSupported));
                }
                let op = match raw_op {
                    BLKIF_OP_READ => IndirectOp::Read,
                    BLKIF_OP_WRITE => IndirectOp::Write,
                    other => {
                        return Err(err(raw_op, InvalidRequest::InvalidIndirectOperation(other)))
                    }
                };
                let nr_segments = le_u16(slot, l.indirect_nr_segments);
                let max = limits
                    .max_indirect_segments
                    .min(MAX_INDIRECT_SEGMENTS_LIMIT);
                if nr_segments == 0 {
                    return Err(err(raw_op, InvalidRequest::NoSegments));
                }
                if nr_segments > max {
                    return Err(err(
                        raw_op,
                        InvalidRequest::TooManySegments {
                            nr: u32::from(nr_segments),
                            max: u32::from(max),
                        },
                    ));
                }
                let pages = indirect_pages(nr_segments);
                // pages <= 8 because nr_segments <= 8 * 512.
                let mut grefs = [0u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
                for (i, g) in grefs.iter_mut().enumerate().take(pages) {
                    *g = le_u32(slot, l.indirect_grefs + 4 * i);
                }
                let indirect_grefs = IndirectGrefs::from_slice(grefs.get(..pages).unwrap_or(&[]))
                    .unwrap_or_default();
                let sector = le_u64(slot, l.indirect_sector_number);
                // Every segment has at least one sector: reject what cannot
                // fit even so now; parse_segments checks the exact range.
                check_range(sector, u64::from(nr_segments)).map_err(|r| err(raw_op, r))?;
                (
                    le_u16(slot, l.indirect_handle),
                    RequestKind::Indirect(Indirect {
                        op,
                        sector,
                        nr_segments,
                        indirect_grefs,
                    }),
                )
            }
            other => return Err(err(other, InvalidRequest::UnknownOperation(other))),
        };
        Ok(Request { id, handle, kind })
    }

    /// The `operation` byte on the wire.
    pub const fn operation(&self) -> u8 {
        match self.kind {
            RequestKind::Read(_) => BLKIF_OP_READ,
            RequestKind::Write(_) => BLKIF_OP_WRITE,
            RequestKind::WriteBarrier(_) => BLKIF_OP_WRITE_BARRIER,
            RequestKind::Flush(_) => BLKIF_OP_FLUSH_DISKCACHE,
            RequestKind::Discard { .. } => BLKIF_OP_DISCARD,
            RequestKind::Indirect(_) => BLKIF_OP_INDIRECT,
        }
    }

    /// The `operation` to put in the response: the request's, except for
    /// indirect requests, which are answered with their `indirect_op`
    /// (what Linux blkback sends and Linux blkfront checks).
    pub const fn response_operation(&self) -> u8 {
        match self.kind {
            RequestKind::Indirect(ind) => ind.op.to_u8(),
            _ => self.operation(),
        }
    }

    /// The response to this request with `status`.
    pub const fn response(&self, status: Status) -> Response {
        Response {
            id: self.id,
            operation: self.response_operation(),
            status,
        }
    }

    /// Serialises the request (the frontend's side; used by tests and the
    /// fuzzers). Every byte of `slot` is written: padding, unused segments
    /// and unused indirect refs are zero. Values are written as they are, so
    /// invalid requests can be built on purpose.
    pub fn write(&self, abi: Abi, slot: &mut [u8; SLOT_SIZE]) {
        let l = abi.layout();
        slot.fill(0);
        slot[0] = self.operation();
        match &self.kind {
            RequestKind::Read(io)
            | RequestKind::Write(io)
            | RequestKind::WriteBarrier(io)
            | RequestKind::Flush(io) => {
                slot[l.req_nr_segments] = io.segments.len() as u8;
                put(slot, l.req_handle, &self.handle.to_le_bytes());
                put(slot, l.req_id, &self.id.to_le_bytes());
                put(slot, l.req_sector_number, &io.sector.to_le_bytes());
                for (i, seg) in io.segments.as_slice().iter().enumerate() {
                    seg.write(slot, l.req_seg + i * segment::SIZE);
                }
            }
            RequestKind::Discard {
                sector,
                nr_sectors,
                secure,
            } => {
                slot[l.discard_flag] = if *secure { BLKIF_DISCARD_SECURE } else { 0 };
                put(slot, l.discard_handle, &self.handle.to_le_bytes());
                put(slot, l.discard_id, &self.id.to_le_bytes());
                put(slot, l.discard_sector_number, &sector.to_le_bytes());
                put(slot, l.discard_nr_sectors, &nr_sectors.to_le_bytes());
            }
            RequestKind::Indirect(ind) => {
                slot[l.indirect_op] = ind.op.to_u8();
                put(slot, l.indirect_nr_segments, &ind.nr_segments.to_le_bytes());
                put(slot, l.indirect_id, &self.id.to_le_bytes());
                put(slot, l.indirect_sector_number, &ind.sector.to_le_bytes());
                put(slot, l.indirect_handle, &self.handle.to_le_bytes());
                for (i, g) in ind.indirect_grefs.as_slice().iter().enumerate() {
                    put(slot, l.indirect_grefs + 4 * i, &g.to_le_bytes());
                }
            }
        }
    }
}

/// Number of indirect pages holding `nr_segments` segments:
/// `ceil(nr_segments / SEGS_PER_INDIRECT_FRAME)` (blkif.h, `BLKIF_OP_INDIRECT`).
pub const fn indirect_pages(nr_segments: u16) -> usize {
    (nr_segments as usize).div_ceil(SEGS_PER_INDIRECT_FRAME)
}

/// Reads the first `n` segments of an indirect page (an array of
/// `struct blkif_request_segment`), validating each like a direct
/// request's. `n` must be at most 512.
pub fn parse_indirect_segments(
    page: &[u8; PAGE_SIZE],
    n: usize,
) -> Result<Vec<Segment>, InvalidRequest> {
    let mut out = Vec::new();
    parse_indirect_segments_into(page, n, &mut out)?;
    Ok(out)
}

/// [`parse_indirect_segments`], appending to `out` (indices in errors count from this page's
/// first segment).
fn parse_indirect_segments_into(
    page: &[u8; PAGE_SIZE],
    n: usize,
    out: &mut Vec<Segment>,
) -> Result<(), InvalidRequest> {
    if n > SEGS_PER_INDIRECT_FRAME {
        return Err(InvalidRequest::TooManySegments {
            nr: u32::try_from(n).unwrap_or(u32::MAX),
            max: SEGS_PER_INDIRECT_FRAME as u32,
        });
    }
    out.reserve(n);
    for index in 0..n {
        let seg = Segment::read(page, index * segment::SIZE);
        if !seg.is_valid() {
            return Err(InvalidRequest::BadSegment {
                index,
                first: seg.first_sect,
                last: seg.last_sect,
            });
        }
        out.push(seg);
    }
    Ok(())
}

/// Writes segments into an indirect page (frontend side, tests): every
/// byte is written, at most 512 segments are taken.
pub fn write_indirect_segments(segs: &[Segment], page: &mut [u8; PAGE_SIZE]) {
    page.fill(0);
    for (i, seg) in segs.iter().take(SEGS_PER_INDIRECT_FRAME).enumerate() {
        seg.write(page, i * segment::SIZE);
    }
}

impl Response {
    /// Writes the response into `buf`, typically a whole ring entry
    /// ([`Abi::entry_size`] bytes): every byte of `buf` is written, the
    /// padding and whatever follows the struct with zeros, so no stale
    /// request bytes or uninitialised memory reach the guest.
    pub fn write(&self, abi: Abi, buf: &mut [u8]) -> Result<(), ResponseError> {
        let l = abi.layout();
        if buf.len() < l.rsp_size {
            return Err(ResponseError::BufferTooSmall {
                need: l.rsp_size,
                got: buf.len(),
            });
        }
        buf.fill(0);
        put(buf, l.rsp_id, &self.id.to_le_bytes());
        put(buf, l.rsp_operation, &[self.operation]);
        put(buf, l.rsp_status, &self.status.to_i16().to_le_bytes());
        Ok(())
    }

    /// Parses a response (the frontend's side).
    pub fn parse(abi: Abi, buf: &[u8]) -> Result<Response, ResponseError> {
        let l = abi.layout();
        if buf.len() < l.rsp_size {
            return Err(ResponseError::BufferTooSmall {
                need: l.rsp_size,
                got: buf.len(),
            });
        }
        let raw = le_u16(buf, l.rsp_status) as i16;
        Ok(Response {
            id: le_u64(buf, l.rsp_id),
            operation: byte(buf, l.rsp_operation),
            status: Status::from_i16(raw).ok_or(ResponseError::UnknownStatus(raw))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(gref: u32, first: u8, last: u8) -> Segment {
        Segment {
            gref,
            first_sect: first,
            last_sect: last,
        }
    }

    fn rw(sector: u64, segs: &[Segment]) -> DirectIo {
        DirectIo {
            sector,
            segments: Segments::from_slice(segs).unwrap(),
        }
    }

    fn slot_of(abi: Abi, r: &Request) -> [u8; SLOT_SIZE] {
        let mut s = [0xAAu8; SLOT_SIZE];
        r.write(abi, &mut s);
        s
    }

    #[test]
    fn x86_64_read_bytes() {
        let r = Request {
            id: 0x1122_3344_5566_7788,
            handle: 0x0a0b,
            kind: RequestKind::Read(rw(0x99, &[seg(0xdead_beef, 1, 6)])),
        };
        let s = slot_of(Abi::X86_64, &r);
        assert_eq!(s[0], 0);
        assert_eq!(s[1], 1);
        assert_eq!(&s[2..4], &[0x0b, 0x0a]);
        assert_eq!(&s[4..8], &[0, 0, 0, 0]);
        assert_eq!(&s[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&s[16..24], &0x99u64.to_le_bytes());
        assert_eq!(&s[24..32], &[0xef, 0xbe, 0xad, 0xde, 1, 6, 0, 0]);
        assert!(s[32..].iter().all(|&b| b == 0));
        assert_eq!(Request::parse(Abi::X86_64, &s), Ok(r));
    }

    #[test]
    fn x86_32_read_bytes() {
        let r = Request {
            id: 0x1122_3344_5566_7788,
            handle: 7,
            kind: RequestKind::Write(rw(0x99, &[seg(5, 0, 7), seg(6, 0, 0)])),
        };
        let s = slot_of(Abi::X86_32, &r);
        assert_eq!(&s[..4], &[1, 2, 7, 0]);
        assert_eq!(&s[4..12], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&s[12..20], &0x99u64.to_le_bytes());
        assert_eq!(&s[20..28], &[5, 0, 0, 0, 0, 7, 0, 0]);
        assert_eq!(&s[28..36], &[6, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Request::parse(Abi::X86_32, &s), Ok(r));
        // Read with the other ABI it is a different request (or garbage).
        assert_ne!(Request::parse(Abi::X86_64, &s), Ok(r));
    }

    #[test]
    fn x86_32_ignores_bytes_past_its_entry() {
        let r = Request {
            id: 1,
            handle: 0,
            kind: RequestKind::Flush(rw(0, &[])),
        };
        let mut s = slot_of(Abi::X86_32, &r);
        s[108..].fill(0xff);
        assert_eq!(Request::parse(Abi::X86_32, &s), Ok(r));
    }

    #[test]
    fn indirect_answers_with_indirect_op() {
        let r = Request {
            id: 9,
            handle: 0,
            kind: RequestKind::Indirect(Indirect {
                op: IndirectOp::Write,
                sector: 0,
                nr_segments: 513,
                indirect_grefs: IndirectGrefs::from_slice(&[1, 2]).unwrap(),
            }),
        };
        assert_eq!(r.operation(), BLKIF_OP_INDIRECT);
        assert_eq!(r.response(Status::Okay).operation, BLKIF_OP_WRITE);
        let mut s = slot_of(Abi::X86_64, &r);
        let big = ParseLimits {
            max_indirect_segments: MAX_INDIRECT_SEGMENTS_LIMIT,
        };
        assert_eq!(Request::parse_with(Abi::X86_64, &s, &big), Ok(r));
        // Above the advertised maximum (default 256): ERROR.
        let e = Request::parse(Abi::X86_64, &s).unwrap_err();
        assert_eq!(e.status(), Status::Error);
        assert_eq!(
            e.reason,
            InvalidRequest::TooManySegments { nr: 513, max: 256 }
        );
        // Refs past ceil(n/512) are ignored.
        s[LAYOUT_X86_64_GREFS + 8..LAYOUT_X86_64_GREFS + 32].fill(0x5a);
        assert_eq!(Request::parse_with(Abi::X86_64, &s, &big), Ok(r));
        // Disabled indirect: EOPNOTSUPP, echoing indirect_op.
        let e = Request::parse_with(
            Abi::X86_64,
            &s,
            &ParseLimits {
                max_indirect_segments: 0,
            },
        )
        .unwrap_err();
        assert_eq!(e.status(), Status::EOpNotSupp);
        assert_eq!(e.response().operation, BLKIF_OP_WRITE);
        assert_eq!(e.id, 9);
    }

    const LAYOUT_X86_64_GREFS: usize = crate::abi::LAYOUT_X86_64.indirect_grefs;

    #[test]
    fn indirect_segments() {
        let ind = Indirect {
            op: IndirectOp::Read,
            sector: 100,
            nr_segments: 515,
            indirect_grefs: IndirectGrefs::from_slice(&[1, 2]).unwrap(),
        };
        assert_eq!(ind.segments_in_page(0), 512);
        assert_eq!(ind.segments_in_page(1), 3);
        assert_eq!(ind.segments_in_page(2), 0);
        assert_eq!(ind.segments_in_page(usize::MAX), 0);
        let segs: Vec<Segment> = (0..515).map(|i| seg(i, 0, (i % 8) as u8)).collect();
        let mut p0 = [0u8; PAGE_SIZE];
        let mut p1 = [0xffu8; PAGE_SIZE];
        write_indirect_segments(&segs[..512], &mut p0);
        write_indirect_segments(&segs[512..], &mut p1);
        assert_eq!(ind.parse_segments(&[&p0, &p1]).unwrap(), segs);
        assert!(matches!(
            ind.parse_segments(&[&p0]),
            Err(InvalidRequest::IndirectPageCount {
                expected: 2,
                got: 1
            })
        ));
        p1[2 * 8 + 5] = 8;
        assert_eq!(
            ind.parse_segments(&[&p0, &p1]),
            Err(InvalidRequest::BadSegment {
                index: 514,
                first: 0,
                last: 8
            })
        );
        assert!(parse_indirect_segments(&p0, 513).is_err());
        assert_eq!(parse_indirect_segments(&p0, 0).unwrap(), vec![]);
        // The exact range check happens here: near the end of the range.
        let near_end = Indirect {
            sector: MAX_SECTORS - 600,
            ..ind
        };
        write_indirect_segments(&segs[512..], &mut p1);
        assert!(matches!(
            near_end.parse_segments(&[&p0, &p1]),
            Err(InvalidRequest::SectorOverflow { .. })
        ));
    }

    #[test]
    fn empty_flush_with_linux_sector() {
        // Linux blkfront's empty flush: no segments, sector_number (sector_t)-1.
        for abi in [Abi::Native, Abi::X86_32, Abi::X86_64] {
            for op in [BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER] {
                let mut s = [0u8; SLOT_SIZE];
                let io = DirectIo {
                    sector: u64::MAX,
                    segments: Segments::new(),
                };
                Request {
                    id: 9,
                    handle: 0,
                    kind: RequestKind::Flush(io),
                }
                .write(abi, &mut s);
                s[0] = op;
                let r = Request::parse(abi, &s).expect("an empty flush has no range to check");
                assert_eq!(r.id, 9);
            }
        }
    }

    #[test]
    fn response_bytes() {
        let rsp = Response {
            id: 0x0102_0304_0506_0708,
            operation: 3,
            status: Status::EOpNotSupp,
        };
        for abi in Abi::ALL {
            let mut buf = [0xeeu8; SLOT_SIZE];
            rsp.write(abi, &mut buf).unwrap();
            assert_eq!(&buf[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
            assert_eq!(buf[8], 3);
            assert_eq!(buf[9], 0);
            assert_eq!(&buf[10..12], &(-2i16).to_le_bytes());
            assert!(buf[12..].iter().all(|&b| b == 0));
            assert_eq!(Response::parse(abi, &buf), Ok(rsp));
        }
        let mut short = [0u8; 11];
        assert!(rsp.write(Abi::X86_32, &mut short).is_err());
        assert!(rsp.write(Abi::X86_32, &mut [0u8; 12]).is_ok());
        assert!(rsp.write(Abi::X86_64, &mut [0u8; 12]).is_err());
        let mut buf = [0u8; 16];
        buf[10] = 5;
        assert_eq!(
            Response::parse(Abi::X86_64, &buf),
            Err(ResponseError::UnknownStatus(5))
        );
    }

    #[test]
    fn segment_helpers() {
        let s = seg(1, 2, 5);
        assert_eq!(s.nr_sectors(), 4);
        assert_eq!(s.offset_bytes(), 1024);
        assert_eq!(s.len_bytes(), 2048);
        assert_eq!(seg(1, 5, 2).nr_sectors(), 0);
        let mut list = Segments::new();
        for i in 0..11 {
            assert!(list.push(seg(i, 0, 7)).is_ok());
        }
        assert!(list.push(seg(11, 0, 7)).is_err());
        assert_eq!(list.nr_sectors(), 88);
        assert!(Segments::from_slice(&[seg(0, 0, 0); 12]).is_none());
        assert!(IndirectGrefs::from_slice(&[0; 9]).is_none());
    }
}
