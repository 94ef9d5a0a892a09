//! The bounded request worker pool: each worker runs one local HTTP exchange
//! ([`super::local_http`]) and sends the response back as frames (PROTOCOL §5–§7).
//!
//! The relay I/O thread calls [`Pool::submit_inline`] (a LAN server [`Pool::submit`]) for every
//! `request` frame and [`Pool::cancel`] / [`Pool::cancel_client`] / [`Pool::cancel_all`] for
//! cancels and lost peers. An inline request ([`Inline`]) runs on the caller's thread until its
//! response is whole, or until its head shows a stream, which a worker then forwards.
//! Every accepted request gets exactly one terminal frame (`response`, `response.end` or
//! `response.error`), sent by the thread that owns the request; a cancel only aborts the local
//! exchange, which makes that thread answer `CANCELLED` at once.

use std::collections::{BTreeMap, VecDeque};
use std::mem::MaybeUninit;

use crate::fasthash::FastMap;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::local_http::{
    self, Abort, Body, BodySource, LocalClient, LocalError, Parked, Pending, Progress, Response,
};
use super::{Outbox, log};
use crate::protocol::{
    CLIENT_HEADER, DEFAULT_ALLOWED_PREFIXES, ErrorCode, Frame, Headers, LARGE_FRAME, Limits,
    RequestFrame, ResponseFrame, SharedStr, UPLOAD_MIN_CHUNK, UPLOAD_WINDOW, base64_chunk_json,
    check_header, check_path, check_request_limits, contains_ignore_ascii_case, is_client_header,
    is_hop_by_hop,
};

/// Workers started when the configuration does not say otherwise.
pub const DEFAULT_WORKERS: usize = 32;

/// A worker that finds no job for this long leaves, unless it is the last one: a burst of
/// streams (each holds a worker while it lasts) does not leave its threads behind for the
/// months a daemon runs. The pool's backend connections unused as long, or closed by the
/// backend, are closed too ([`LocalClient::close_idle`], by the `worker-answers` thread):
/// servers close theirs sooner (uvicorn after 5 s), and such a socket is a descriptor held for
/// nothing until the next request. (The relay I/O thread ages its own parked connections on
/// its ping ticks.)
pub const WORKER_IDLE: Duration = Duration::from_secs(30);

/// Requests waiting for a free worker before new ones are answered `BUSY`.
pub const QUEUE_CAPACITY: usize = 64;

/// Responses larger than this (or of unknown length, or SSE) are streamed (PROTOCOL §5).
pub const STREAM_THRESHOLD: u64 = 256 << 10;

/// Largest body piece in one `response.chunk`.
pub const CHUNK_MAX: usize = 256 << 10;

/// Request bodies (as sent in the frame) up to this size may run inline ([`Pool::submit_inline`]).
pub const INLINE_BODY_MAX: usize = 48 << 10;

/// Responses up to this size are answered inline; larger, chunked or event-stream responses go
/// to a worker once their head is read.
pub const INLINE_RESPONSE_MAX: u64 = 64 << 10;

/// Uploads (`request.start`) running at once on one bridge, and from one app: each holds a
/// worker for as long as its body arrives, so they may take only part of the pool (a busy
/// moment's streams and large requests need the rest).
pub const MAX_UPLOADS: (usize, usize) = (16, 8);

/// How long [`Pool::shutdown`] waits for open requests to be answered.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Methods forwarded to the backend.
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// Locks a mutex, ignoring poisoning: every critical section here leaves consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fixed local backend. Comes from local configuration only; never chosen by a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host of the backend, `127.0.0.1` by default.
    pub host: String,
    /// Port of the backend.
    pub port: u16,
    /// Path prefixes forwarded (PROTOCOL §7); anything else is `FORBIDDEN_PATH`.
    pub allowed_prefixes: Vec<String>,
    /// The built-in backend's key and the exact address it listens on, when this bridge
    /// started the built-in backend itself: the key is sent with every request, and only to
    /// that address (a `localhost` that resolves to `::1` first never hands it to whoever
    /// listens there). `None` for any other backend.
    pub backend_key: Option<(crate::backend::key::BackendKey, std::net::SocketAddr)>,
}

impl Target {
    /// `host:port` with the default allowed prefixes.
    pub fn new(host: &str, port: u16) -> Target {
        Target {
            host: host.to_owned(),
            port,
            allowed_prefixes: DEFAULT_ALLOWED_PREFIXES.iter().map(|p| (*p).to_owned()).collect(),
            backend_key: None,
        }
    }

    /// `http://host:port` ([`http_url`]), as status.json's `backendUrl` names the backend.
    pub fn url(&self) -> String {
        http_url(&self.host, self.port)
    }

    /// The host (bare) and port of a `backendUrl`; an IPv6 host is bracketed, or bare as older
    /// daemons wrote it.
    pub fn parse_url(url: &str) -> Option<(String, u16)> {
        let (host, port) = url.trim_start_matches("http://").rsplit_once(':')?;
        Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
    }
}

/// `host:port` as a URL or a `Host` header writes it: an IPv6 host in brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// `http://host:port` ([`authority`]): the form of status.json's `backendUrl` and of every
/// message naming a backend.
pub fn http_url(host: &str, port: u16) -> String {
    format!("http://{}", authority(host, port))
}

/// Identifies an open request: (client, id). `client` is `None` for LAN sockets.
type Key = (Option<String>, String);

/// An open request's cancellation state.
struct Open {
    /// Aborts the local exchange.
    abort: Abort,
    /// The code answered when the exchange ends because of the abort.
    reason: ErrorCode,
    /// The body still arriving, for a `request.start`.
    upload: Option<Arc<Upload>>,
}

impl Open {
    /// Wakes the worker of an upload that waits for a piece: the request is being stopped.
    fn end_upload(&self) {
        if let Some(upload) = &self.upload {
            upload.end();
        }
    }
}

/// The body of a `request.start` while its `request.chunk` frames arrive: filled by the thread
/// that reads frames ([`Pool::upload_chunk`]), which must never wait, and poured into the
/// backend by the worker that runs the request, which acknowledges every piece with a
/// `request.ack`. The app keeps at most [`UPLOAD_WINDOW`] bytes unacknowledged, so an upload
/// holds at most that much here.
#[derive(Debug)]
pub struct Upload {
    /// The pieces and the counts.
    state: Mutex<UploadState>,
    /// Signalled when a piece arrives or the upload ends.
    arrived: Condvar,
    /// The body's length, from `request.start`.
    len: u64,
}

/// What an [`Upload`] holds now.
#[derive(Debug, Default)]
struct UploadState {
    /// Pieces not poured yet, with their decoded length and whether they are base64.
    pieces: VecDeque<(SharedStr, u64, bool)>,
    /// Bytes received in all (decoded).
    received: u64,
    /// Bytes the backend has taken (the last `request.ack`).
    taken: u64,
    /// Why the body cannot be completed (a piece broke the rules): the worker fails the
    /// request with it.
    broken: Option<String>,
    /// The request was aborted: stop waiting for pieces.
    ended: bool,
}

impl Upload {
    /// Ends the upload: a worker waiting for a piece returns.
    fn end(&self) {
        lock(&self.state).ended = true;
        self.arrived.notify_all();
    }

    /// Takes one arrived piece, or records why the body is broken (false: it broke now).
    /// Never waits.
    fn push(&self, body: SharedStr, base64: bool) -> bool {
        let len = if base64 {
            Body::base64(&body).map(|b| b.len() as u64).map_err(|e| e.to_string())
        } else {
            Ok(body.len() as u64)
        };
        let mut state = lock(&self.state);
        if state.broken.is_some() || state.ended {
            return true;
        }
        let problem = match len {
            Err(e) => Some(format!("a request.chunk is not valid base64: {e}")),
            Ok(0) => Some("a request.chunk carries no bytes".to_owned()),
            Ok(n) if state.received + n > self.len => Some(format!(
                "the request.chunk frames carry more than the {} bytes request.start announced",
                self.len
            )),
            // Tiny pieces would cost far more to hold and to pass on than the bytes they carry.
            Ok(n) if n < UPLOAD_MIN_CHUNK && state.received + n != self.len => Some(format!(
                "a request.chunk carries {n} bytes: each but the last must carry at least \
                 {UPLOAD_MIN_CHUNK}"
            )),
            Ok(n) if state.received + n - state.taken > UPLOAD_WINDOW => {
                Some(format!("more than {UPLOAD_WINDOW} body bytes were sent ahead of request.ack"))
            }
            Ok(n) => {
                state.received += n;
                state.pieces.push_back((body, n, base64));
                None
            }
        };
        let broke = problem.is_some();
        state.broken = problem;
        drop(state);
        self.arrived.notify_all();
        !broke
    }

    /// Why the body broke, if it did.
    fn broken(&self) -> Option<String> {
        lock(&self.state).broken.clone()
    }
}

/// The body source of one running upload: pours its pieces and acknowledges each.
struct Pouring<'a> {
    /// The pieces.
    upload: &'a Upload,
    /// The request, for its `request.ack` frames.
    id: &'a str,
    /// The app, for its `request.ack` frames.
    client: Option<&'a str>,
    /// The app socket's number, for its `request.ack` frames.
    conn: Option<u64>,
    /// Where the `request.ack` frames go.
    out: &'a Outbox,
    /// The request's abort: no `request.ack` once it is silenced or aborted.
    abort: &'a Abort,
    /// Longest wait for the next piece.
    gap: Duration,
}

impl std::fmt::Debug for Pouring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pouring").field("id", &self.id).field("upload", self.upload).finish()
    }
}

impl BodySource for Pouring<'_> {
    fn pour(
        &self,
        write: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), Result<LocalError, std::io::Error>> {
        let upload = self.upload;
        let mut taken = 0;
        while taken < upload.len {
            let (piece, n, base64) = {
                let mut state = lock(&upload.state);
                loop {
                    if state.ended || state.broken.is_some() {
                        // `conclude` answers with the reason.
                        return Err(Ok(LocalError::Aborted));
                    }
                    if let Some(piece) = state.pieces.pop_front() {
                        break piece;
                    }
                    let (next, waited) = upload
                        .arrived
                        .wait_timeout(state, self.gap)
                        .unwrap_or_else(|p| p.into_inner());
                    state = next;
                    if waited.timed_out() && state.pieces.is_empty() && !state.ended {
                        let secs = self.gap.as_secs();
                        state.broken = Some(format!("no request.chunk arrived for {secs} s"));
                        return Err(Ok(LocalError::Aborted));
                    }
                }
            };
            if base64 {
                // Checked when it arrived: it decodes to `n` bytes.
                let body = Body::base64(&piece).map_err(Ok)?;
                body.write_with(&mut *write)?;
            } else {
                write(piece.as_bytes()).map_err(Err)?;
            }
            taken += n;
            lock(&upload.state).taken = taken;
            if self.abort.is_aborted() || self.abort.is_silenced() {
                // The app may have gone and reused the id: this ack is not for it.
                continue;
            }
            let ack = Frame::RequestAck {
                id: self.id.to_owned(),
                client: self.client.map(str::to_owned),
                conn: self.conn,
                bytes: taken,
            };
            // A lost connection silences the request; the next wait sees it ended.
            let _ = self.out.send(ack.to_json());
        }
        Ok(())
    }
}

/// A request waiting for (or being run by) a worker.
struct Job {
    /// The frame as received.
    req: RequestFrame,
    /// Where its frames go.
    out: Outbox,
    /// Its abort handle (also in the open map).
    abort: Abort,
    /// The response, when the head was already read by an inline exchange.
    response: Option<Response>,
    /// The body still arriving, for a `request.start`.
    upload: Option<Arc<Upload>>,
}

/// A request run by the caller's own readiness-driven thread instead of a worker (see
/// [`Pool::submit_inline`]): it writes the request and reads a small response without
/// blocking, so a small exchange costs no thread hand-off. The caller watches
/// [`Inline::socket`] and calls [`Pool::advance`] when it is ready, [`Pool::expire`] past
/// [`Inline::deadline`], or [`Pool::end_inline`] when it stops.
pub struct Inline(Box<Running>);

/// The parts of an [`Inline`] request, boxed: the request moves between the I/O loop and the
/// pool several times per readiness event, and as a pointer that costs nothing, where the
/// parts (968 bytes) were copied each time (docs/PERFORMANCE.md, stop 18).
struct Running {
    /// The request; its body is kept for a resend on a fresh connection.
    job: Job,
    /// The exchange.
    pending: Pending,
}

/// Freed boxes of `T`, kept for the next values (at most [`SPARE_BOXES`]); for [`Running`].
///
/// musl's allocator maps a fresh page for each group of a few blocks of `Running`'s size (968
/// bytes) and unmaps it as soon as the group is free again: with 16 requests in flight the
/// static daemon mapped and unmapped a page about every seventh request, up to a tenth of its
/// CPU at c16 by the profile (docs/PERFORMANCE.md, stop 20). A box reused costs an uncontended
/// lock on each side (only the relay I/O thread runs inline requests).
// The boxes are the point: each is an allocation kept for reuse.
#[allow(clippy::vec_box)]
struct SpareBoxes<T>(Mutex<Vec<Box<MaybeUninit<T>>>>);

/// Boxes a [`SpareBoxes`] keeps: one per inline request in flight on a busy connection.
const SPARE_BOXES: usize = 32;

impl<T> SpareBoxes<T> {
    fn new() -> SpareBoxes<T> {
        SpareBoxes(Mutex::new(Vec::new()))
    }

    /// `value` in a box: a spare one if there is one.
    fn boxed(&self, value: T) -> Box<T> {
        match lock(&self.0).pop() {
            Some(spare) => Box::write(spare, value),
            None => Box::new(value),
        }
    }

    /// The value of `boxed`, its box kept for the next one.
    fn unboxed(&self, boxed: Box<T>) -> T {
        let raw = Box::into_raw(boxed);
        // SAFETY: `raw` comes from `Box::into_raw`: valid, aligned and initialised. It is read
        // once; from here on the allocation is only used as `MaybeUninit<T>`, so the value
        // moved out is never dropped twice.
        let value = unsafe { raw.read() };
        // SAFETY: `MaybeUninit<T>` has the layout of `T`, so the allocation is a valid box of
        // it (and freed with the same layout if it is not kept).
        let spare = unsafe { Box::from_raw(raw.cast::<MaybeUninit<T>>()) };
        let mut spares = lock(&self.0);
        if spares.len() < SPARE_BOXES {
            spares.push(spare);
        }
        value
    }
}

impl Inline {
    /// The backend socket to watch (a shared handle: holding it keeps the descriptor open
    /// until the caller has stopped watching it).
    pub fn socket(&self) -> &Arc<std::net::TcpStream> {
        self.0.pending.socket()
    }

    /// When the response head must have arrived (`None`: never).
    pub fn deadline(&self) -> Option<Instant> {
        self.0.pending.deadline()
    }

    /// The tag of the caller's parked connection it runs on, if it took one.
    pub fn tag(&self) -> Option<usize> {
        self.0.pending.tag()
    }
}

/// What the caller does next with an [`Inline`] request.
pub enum Step {
    /// Call [`Pool::advance`] again when the socket is readable (or writable when `writable`).
    Wait(Inline, Interest),
    /// Nothing more to do here: answered, or handed to a worker. The connection, when it may
    /// serve another request, is given back to park; otherwise stop watching the socket.
    Done(Option<Parked>),
}

/// The readiness an [`Inline`] request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// The response (or more of it).
    Readable,
    /// Room for the rest of the request.
    Writable,
}

/// Open requests and the shutdown state, under one lock.
struct OpenState {
    /// Every accepted request that has not had its terminal frame sent yet.
    map: FastMap<Key, Open>,
    /// Set by [`Pool::shutdown`]: new requests are refused with this code.
    closing: Option<ErrorCode>,
}

/// The work queues.
struct Queue {
    /// Requests waiting for a worker.
    jobs: VecDeque<Job>,
    /// Aborted requests pulled out of `jobs`: they only need their error frame, so they must
    /// not wait behind long-running exchanges.
    answers: VecDeque<Job>,
    /// Threads exit once the queues are empty.
    stopping: bool,
    /// Workers running (they start on demand, up to `Shared::max_workers`, and all but one
    /// leave after `Shared::idle_for` without a job).
    running: usize,
    /// Workers ever started: the next one's name (`worker-N`).
    spawned: usize,
    /// Workers waiting for a job now.
    waiting: usize,
}

/// State shared by the pool handle and its threads.
struct Shared {
    /// The backend client (keep-alive pool inside).
    client: LocalClient,
    /// Allowed path prefixes.
    allowed: Vec<String>,
    /// Limits of PROTOCOL §6.
    limits: Limits,
    /// Open requests. Lock order: `open` before `queue`.
    open: Mutex<OpenState>,
    /// Signalled when an open request is removed while the pool shuts down (the only time
    /// anyone waits on it: a notify costs a syscall even without a waiter).
    drained: Condvar,
    /// Queued work.
    queue: Mutex<Queue>,
    /// Wakes workers: a job or an answer arrived, or the pool stops.
    work: Condvar,
    /// Wakes the answer thread.
    answer: Condvar,
    /// Most workers started.
    max_workers: usize,
    /// How long a worker waits for a job before it leaves, and a pooled backend connection
    /// stays unused before it is closed ([`WORKER_IDLE`]).
    idle_for: Duration,
    /// Boxes for inline requests.
    boxes: SpareBoxes<Running>,
}

/// The bounded worker pool. Share it behind an `Arc`; every method takes `&self`.
pub struct Pool {
    /// Shared with the threads.
    shared: Arc<Shared>,
}

impl Pool {
    /// Starts one worker thread and one `worker-answers` thread that answers requests aborted
    /// while still queued. More workers (`worker-N`, up to `workers`) start when a job finds
    /// none waiting, and leave after [`WORKER_IDLE`] without one: most requests run inline on
    /// the relay I/O thread, so an idle daemon keeps few threads.
    pub fn new(target: Target, workers: usize, limits: Limits) -> Pool {
        Pool::with_idle(target, workers, limits, WORKER_IDLE)
    }

    /// As [`Pool::new`], with workers that leave after `idle_for` without a job.
    pub fn with_idle(target: Target, workers: usize, limits: Limits, idle_for: Duration) -> Pool {
        let shared = Arc::new(Shared {
            client: match target.backend_key {
                Some((key, addr)) => {
                    LocalClient::new(&target.host, target.port).with_backend_key(key, addr)
                }
                None => LocalClient::new(&target.host, target.port),
            },
            allowed: target.allowed_prefixes,
            limits,
            open: Mutex::new(OpenState { map: FastMap::default(), closing: None }),
            drained: Condvar::new(),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                answers: VecDeque::new(),
                stopping: false,
                running: 1,
                spawned: 1,
                waiting: 0,
            }),
            work: Condvar::new(),
            answer: Condvar::new(),
            max_workers: workers.max(1),
            idle_for,
            boxes: SpareBoxes::new(),
        });
        let pool = Pool { shared };
        if !pool.spawn_worker(0) {
            // Nothing would ever run a queued job: refuse everything as BUSY instead.
            lock(&pool.shared.queue).stopping = true;
        }
        let s = pool.shared.clone();
        let _ = std::thread::Builder::new()
            .name("worker-answers".into())
            .spawn(move || worker_loop(&s, true));
        pool
    }

    /// Starts worker `n`; false when the system refused the thread.
    fn spawn_worker(&self, n: usize) -> bool {
        let s = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || worker_loop(&s, false));
        if spawned.is_err() {
            lock(&self.shared.queue).running -= 1;
        }
        spawned.is_ok()
    }

    /// Queues a request. On refusal returns a ready frame (JSON text) for the caller to send
    /// back on the same connection: `response.error` (`BUSY`, `SHUTTING_DOWN`, or a validation
    /// code such as `FORBIDDEN_PATH`), or an `error` `BAD_FRAME` for a duplicate open id (which
    /// must not terminate the request already open under that id).
    pub fn submit(&self, req: RequestFrame, out: Outbox) -> Result<(), String> {
        self.submit_inline(req, out, None).map(|_| ())
    }

    /// As [`Pool::submit`]; when the caller can run requests itself (`parking`: its parked
    /// connections), the body is small and a keep-alive backend connection is at hand (parked,
    /// or idle in the pool), the request is started on it without blocking and returned for
    /// the caller to drive (`Ok(Some)`), instead of being queued for a worker.
    pub fn submit_inline(
        &self,
        req: RequestFrame,
        out: Outbox,
        parking: Option<&mut Vec<Parked>>,
    ) -> Result<Option<Inline>, String> {
        let shared = &self.shared;
        let job = self.admit(req, out, false)?;
        let parking = match parking {
            Some(p) if job.req.body.as_ref().is_none_or(|b| b.len() <= INLINE_BODY_MAX) => p,
            _ => {
                self.enqueue(job);
                return Ok(None);
            }
        };
        match start_inline(shared, job, parking) {
            Ok(inline) => Ok(Some(inline)),
            Err(job) => {
                self.enqueue(job);
                Ok(None)
            }
        }
    }

    /// Queues a `request.start` for a worker, which sends the head to the backend at once and
    /// then the body as its `request.chunk` frames arrive ([`Pool::upload_chunk`]). Refusals
    /// as for [`Pool::submit`].
    pub fn submit_upload(&self, req: RequestFrame, out: Outbox) -> Result<(), String> {
        let job = self.admit(req, out, true)?;
        self.enqueue(job);
        Ok(())
    }

    /// Hands a `request.chunk` to its upload. A chunk that breaks the rules (more than the
    /// announced length, more than [`UPLOAD_WINDOW`] ahead of `request.ack`, bad base64) fails
    /// the request with `BAD_REQUEST`; one for a request that is not an open upload (it ended
    /// already, say) is dropped. Never waits.
    pub fn upload_chunk(&self, client: Option<&str>, id: &str, body: SharedStr, base64: bool) {
        let upload = {
            let open = lock(&self.shared.open);
            let key: Key = (client.map(str::to_owned), id.to_owned());
            match open.map.get(&key).and_then(|o| o.upload.clone()) {
                Some(upload) => upload,
                None => return,
            }
        };
        if !upload.push(body, base64) {
            // Answered at once, also while the job still waits for a worker.
            self.abort_where(|(c, i)| c.as_deref() == client && i == id, ErrorCode::BadRequest);
        }
    }

    /// Admits a request into the open map (ids, limits, validation, shutdown), as a job.
    fn admit(&self, req: RequestFrame, out: Outbox, upload: bool) -> Result<Job, String> {
        let shared = &self.shared;
        let key: Key = (req.client.clone(), req.id.clone());
        let refuse =
            |code: ErrorCode, message: String| Err(Frame::error_for(&req, code, message).to_json());
        let mut open = lock(&shared.open);
        // A request whose terminal frame is on its way no longer owns its id.
        if open.map.get(&key).is_some_and(|o| o.abort.is_finishing()) {
            open.map.remove(&key);
        }
        if open.map.contains_key(&key) {
            return Err(Frame::bad_frame(format!(
                "request id {:?} is already open; the duplicate was dropped",
                req.id
            ))
            .to_json());
        }
        if let Some(code) = open.closing {
            return refuse(code, "the bridge is shutting down".into());
        }
        if let Err((code, message)) = validate(&req, upload, &shared.allowed, &shared.limits) {
            return refuse(code, message);
        }
        if open.map.len() >= shared.limits.max_open_per_bridge {
            return refuse(ErrorCode::Busy, "too many open requests on this bridge".into());
        }
        let per_client = open.map.keys().filter(|(c, _)| *c == req.client).count();
        if per_client >= shared.limits.max_open_per_app {
            return refuse(ErrorCode::Busy, "too many open requests from this app".into());
        }
        if upload {
            let uploads = open.map.iter().filter(|(_, o)| o.upload.is_some());
            let (all, mine) = uploads.fold((0, 0), |(all, mine), ((c, _), _)| {
                (all + 1, mine + usize::from(*c == req.client))
            });
            if all >= MAX_UPLOADS.0 || mine >= MAX_UPLOADS.1 {
                let (bridge, app) = MAX_UPLOADS;
                let message = format!(
                    "too many uploads at once (at most {bridge} on the bridge, {app} from one app)"
                );
                return refuse(ErrorCode::Busy, message);
            }
        }
        let queue = lock(&shared.queue);
        if queue.stopping || queue.jobs.len() >= QUEUE_CAPACITY {
            return refuse(ErrorCode::Busy, "every bridge worker is busy; try again".into());
        }
        let abort = Abort::new();
        let upload = upload.then(|| {
            let len = req.length.unwrap_or(0);
            Arc::new(Upload { state: Mutex::default(), arrived: Condvar::new(), len })
        });
        let entry =
            Open { abort: abort.clone(), reason: ErrorCode::Cancelled, upload: upload.clone() };
        open.map.insert(key, entry);
        Ok(Job { req, out, abort, response: None, upload })
    }

    /// Queues an accepted job for a worker, starting one more when more jobs wait than
    /// workers do; once the pool stops it is answered instead.
    fn enqueue(&self, job: Job) {
        let shared = &self.shared;
        let mut queue = lock(&shared.queue);
        if queue.stopping {
            // The pool's threads may have left already (they exit once the queues are empty):
            // a thread of its own answers this one. It was accepted before the shutdown
            // began, so the shutdown aborted it: the answer is immediate.
            drop(queue);
            let s = shared.clone();
            let answered = std::thread::Builder::new()
                .name("worker-late".into())
                .spawn(move || run_job(&s, job));
            if answered.is_err() {
                log("cannot start a thread to answer a request that came in during shutdown");
            }
            return;
        }
        queue.jobs.push_back(job);
        // A worker blocked on a full outbox or a slow backend is not waiting.
        let spawn = queue.jobs.len() > queue.waiting && queue.running < shared.max_workers;
        let n = queue.spawned;
        if spawn {
            queue.running += 1;
            queue.spawned += 1;
        }
        drop(queue);
        if spawn {
            self.spawn_worker(n);
        }
        shared.work.notify_one();
    }

    /// Drives an inline request as far as its socket allows; the terminal frame, if this
    /// produces it, goes to `push` (the caller's own queue: it must not wait for room, since
    /// the caller is the thread that makes room).
    pub fn advance(&self, mut inline: Inline, push: &mut dyn FnMut(String)) -> Step {
        let shared = &self.shared;
        let progress = inline.0.pending.advance(&shared.client);
        let job = &inline.0.job;
        let mut parked = None;
        let result = match progress {
            Progress::Wait { writable } => {
                let interest = if writable { Interest::Writable } else { Interest::Readable };
                return Step::Wait(inline, interest);
            }
            Progress::Whole(mut resp) => {
                let result = match whole_frame(shared, &job.req, &mut resp) {
                    Ok(frame) if !job.abort.is_silenced() => {
                        job.abort.mark_finishing();
                        push(frame.to_json());
                        Ok(())
                    }
                    Ok(_) => Ok(()),
                    Err(fail) => Err(fail),
                };
                parked = resp.body.take_parked();
                result
            }
            Progress::Streamed(resp) => {
                let job = shared.boxes.unboxed(inline.0).job;
                self.enqueue(Job { response: Some(resp), ..job });
                return Step::Done(None);
            }
            Progress::Stale if local_http::is_retry_safe(&job.req.method) => {
                // The backend closed the pooled connection while it was idle: a worker sends
                // the request again on another one.
                self.enqueue(shared.boxes.unboxed(inline.0).job);
                return Step::Done(None);
            }
            Progress::Stale => Err(Fail::Local(LocalError::Io {
                addr: shared.client.peer().to_owned(),
                detail: "connection closed before a response".into(),
            })),
            Progress::Failed(e) => Err(Fail::Local(e)),
        };
        let Running { job, pending } = shared.boxes.unboxed(inline.0);
        drop(pending);
        conclude(shared, &job, result, push);
        Step::Done(parked)
    }

    /// Gives a parked connection to the workers' idle pool.
    pub fn unpark(&self, parked: Parked) {
        self.shared.client.unpark(parked);
    }

    /// Ends an inline request whose deadline passed (`BACKEND_TIMEOUT`; `CANCELLED` when a
    /// cancel came first).
    pub fn expire(&self, inline: Inline, push: &mut dyn FnMut(String)) {
        let Running { job, pending } = self.shared.boxes.unboxed(inline.0);
        let e = pending.timed_out(&self.shared.client);
        let e = if job.abort.is_aborted() { LocalError::Aborted } else { e };
        conclude(&self.shared, &job, Err(Fail::Local(e)), push);
    }

    /// Ends an inline request with `code` (the caller stops, e.g. `SHUTTING_DOWN`); its
    /// backend connection is closed.
    pub fn end_inline(&self, inline: Inline, code: ErrorCode, push: &mut dyn FnMut(String)) {
        let Running { job, pending } = self.shared.boxes.unboxed(inline.0);
        // The shared abort: it records `code` unless a cancel came first, which keeps its
        // answer.
        let (client, id) = (&job.req.client, &job.req.id);
        self.abort_where(|(c, i)| c == client && i == id, code);
        drop(pending);
        conclude(&self.shared, &job, Err(Fail::Local(LocalError::Aborted)), push);
    }

    /// Aborts one request (`cancel` frame). It is answered `CANCELLED` unless its response
    /// already ended. `client` is `None` for LAN sockets.
    pub fn cancel(&self, client: Option<&str>, id: &str) {
        self.abort_where(|(c, i)| c.as_deref() == client && i == id, ErrorCode::Cancelled);
    }

    /// Drops every request of one app (`client.disconnected`): aborted at once and forgotten
    /// without a frame, since nobody is left to answer — and so that the app, reconnected,
    /// may reuse its request ids at once.
    pub fn cancel_client(&self, client: &str) {
        self.silence_where(|(c, _)| c.as_deref() == Some(client));
    }

    /// Drops every open request (the relay socket was lost; the relay answered the apps).
    pub fn cancel_all(&self) {
        self.silence_where(|_| true);
    }

    fn silence_where(&self, matches: impl Fn(&Key) -> bool) {
        let shared = &self.shared;
        let mut open = lock(&shared.open);
        open.map.retain(|key, entry| {
            if matches(key) {
                entry.abort.silence();
                entry.end_upload();
                false
            } else {
                true
            }
        });
        // Queued jobs of those requests need no answer at all.
        lock(&shared.queue).jobs.retain(|j| !j.abort.is_silenced());
        let waited_on = open.closing.is_some();
        drop(open);
        if waited_on {
            shared.drained.notify_all();
        }
    }

    /// Worker threads running now (started on demand; idle ones leave).
    pub fn workers_running(&self) -> usize {
        lock(&self.shared.queue).running
    }

    /// Whether request `id` of app `client` is open (accepted, its terminal frame not sent).
    pub fn is_open(&self, client: Option<&str>, id: &str) -> bool {
        lock(&self.shared.open).map.keys().any(|(c, i)| c.as_deref() == client && i == id)
    }

    /// Requests accepted and not yet answered with their terminal frame.
    pub fn open_requests(&self) -> usize {
        lock(&self.shared.open).map.len()
    }

    /// Refuses new requests, answers every open one `response.error` with `code` (normally
    /// `SHUTTING_DOWN`; requests already cancelled keep `CANCELLED`) and lets the threads exit.
    /// Waits up to [`SHUTDOWN_GRACE`] for those answers to be handed to their outboxes, so the
    /// caller can flush them right after; never longer, since the caller may itself be the
    /// thread that drains a full outbox. Idempotent.
    pub fn shutdown(&self, code: ErrorCode) {
        let shared = &self.shared;
        {
            let mut open = lock(&shared.open);
            open.closing.get_or_insert(code);
        }
        self.abort_where(|_| true, code);
        stop_threads(shared);
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut open = lock(&shared.open);
        while !open.map.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = shared.drained.wait_timeout(open, left).map(|(g, _)| g).unwrap_or_else(|p| {
                let (g, _) = p.into_inner();
                g
            });
        }
    }

    /// Aborts the open requests whose key matches; requests still queued move to the answer
    /// queue so they are answered at once instead of after a free worker.
    fn abort_where(&self, matches: impl Fn(&Key) -> bool, reason: ErrorCode) {
        let shared = &self.shared;
        let mut open = lock(&shared.open);
        let mut hit = false;
        for (key, entry) in open.map.iter_mut() {
            if matches(key) {
                hit = true;
                if !entry.abort.is_aborted() {
                    entry.reason = reason;
                }
                entry.abort.abort();
                entry.end_upload();
            }
        }
        if !hit {
            return;
        }
        let mut queue = lock(&shared.queue);
        let (pulled, kept): (VecDeque<Job>, VecDeque<Job>) =
            queue.jobs.drain(..).partition(|j| j.abort.is_aborted());
        queue.jobs = kept;
        let any = !pulled.is_empty();
        queue.answers.extend(pulled);
        drop(queue);
        drop(open);
        if any {
            // Idle workers help too, in case the answer thread waits on a full outbox.
            shared.answer.notify_one();
            shared.work.notify_all();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The threads hold the shared state: without this they would wait for work forever.
        self.abort_where(|_| true, ErrorCode::ShuttingDown);
        stop_threads(&self.shared);
    }
}

/// Tells every thread to exit once the queues are empty; queued jobs become answers.
fn stop_threads(shared: &Shared) {
    let mut queue = lock(&shared.queue);
    queue.stopping = true;
    let jobs: Vec<Job> = queue.jobs.drain(..).collect();
    queue.answers.extend(jobs);
    drop(queue);
    shared.work.notify_all();
    shared.answer.notify_all();
}

/// A thread's loop. Workers take answers first (they are instant), then jobs; the answer
/// thread only takes answers.
fn worker_loop(shared: &Shared, answers_only: bool) {
    let mut next_sweep = Instant::now() + shared.idle_for;
    loop {
        let job = {
            let mut queue = lock(&shared.queue);
            loop {
                let next = match queue.answers.pop_front() {
                    Some(j) => Some(j),
                    None if answers_only => None,
                    None => queue.jobs.pop_front(),
                };
                if let Some(j) = next {
                    break j;
                }
                if queue.stopping {
                    return;
                }
                if answers_only {
                    // This thread never leaves, so it is the one that closes the backend
                    // connections left idle (a worker may be busy with a stream for hours),
                    // every `idle_for`, however often answers wake it.
                    let now = Instant::now();
                    if now >= next_sweep {
                        drop(queue);
                        shared.client.close_idle(shared.idle_for);
                        next_sweep = now + shared.idle_for;
                        queue = lock(&shared.queue);
                        continue;
                    }
                    queue = shared
                        .answer
                        .wait_timeout(queue, next_sweep - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    continue;
                }
                queue.waiting += 1;
                let (q, wait) = shared
                    .work
                    .wait_timeout(queue, shared.idle_for)
                    .unwrap_or_else(|p| p.into_inner());
                queue = q;
                queue.waiting -= 1;
                // Idle for a while: the last worker stays, the others leave. A job queued
                // meanwhile is taken first (the loop's top), so none is left without a worker.
                if wait.timed_out()
                    && queue.jobs.is_empty()
                    && queue.answers.is_empty()
                    && queue.running > 1
                {
                    queue.running -= 1;
                    return;
                }
            }
        };
        run_job(shared, job);
    }
}

/// Why an exchange did not end with a sent terminal frame.
enum Fail {
    /// The request itself is unusable.
    Request(ErrorCode, String),
    /// The backend exchange failed (or was aborted).
    Local(LocalError),
    /// The connection that carried the request is gone: nothing can be answered.
    Gone,
}

/// Runs one request to its terminal frame, then forgets it.
fn run_job(shared: &Shared, mut job: Job) {
    let result = if job.abort.is_aborted() {
        Err(Fail::Local(LocalError::Aborted))
    } else {
        exchange(shared, &mut job)
    };
    let out = job.out.clone();
    // A failed send means the connection is gone; there is nobody left to tell.
    conclude(shared, &job, result, &mut |text| {
        let _ = out.send(text);
    });
}

/// Ends a request: sends its error frame when `result` failed (the success path sent its own
/// terminal frame), then forgets it.
fn conclude(shared: &Shared, job: &Job, result: Result<(), Fail>, send: &mut dyn FnMut(String)) {
    let key: Key = (job.req.client.clone(), job.req.id.clone());
    let failure = match result {
        _ if job.abort.is_silenced() => None,
        Ok(()) | Err(Fail::Gone) => None,
        Err(Fail::Request(code, message)) => Some((code, message)),
        Err(Fail::Local(LocalError::Aborted)) => {
            // An upload whose piece broke the rules is aborted for it (a cancel or a stop
            // that came first leaves the upload ended, never broken).
            match job.upload.as_ref().and_then(|u| u.broken()) {
                Some(why) => Some((ErrorCode::BadRequest, why)),
                None => {
                    let open = lock(&shared.open);
                    let reason = open.map.get(&key).map_or(ErrorCode::Cancelled, |o| o.reason);
                    let message = match reason {
                        ErrorCode::Cancelled => "the request was cancelled",
                        ErrorCode::ShuttingDown => "the bridge is shutting down",
                        _ => "the request was aborted",
                    };
                    Some((reason, message.to_owned()))
                }
            }
        }
        Err(Fail::Local(e)) => Some((e.code(), e.to_string())),
    };
    if let Some((code, message)) = failure {
        job.abort.mark_finishing();
        send(Frame::error_for(&job.req, code, message).to_json());
    }
    // Forget the request only after its terminal frame is queued, so a duplicate id cannot
    // overtake it.
    // A silenced request was already forgotten, and its id may belong to a new request now.
    let mut open = lock(&shared.open);
    if open.map.get(&key).is_some_and(|o| o.abort.same(&job.abort)) {
        open.map.remove(&key);
    }
    // `shutdown` sets `closing` before it waits, under this lock: no wake-up is lost.
    let waited_on = open.closing.is_some();
    drop(open);
    if waited_on {
        shared.drained.notify_all();
    }
}

/// Starts a request on an idle backend connection without blocking, or gives the job back for
/// a worker (no idle connection, an aborted request, a body to be rejected by the worker).
// A refused job goes back to the caller, which queues it: a move, on the rarer path.
#[allow(clippy::result_large_err)]
fn start_inline(shared: &Shared, job: Job, parking: &mut Vec<Parked>) -> Result<Inline, Job> {
    let Ok(body) = request_body(&job.req, &shared.limits) else {
        // The worker reports it.
        return Err(job);
    };
    let headers = backend_headers(&job.req);
    let started = shared.client.start(
        &job.req.method,
        &job.req.path,
        &headers,
        body,
        &job.abort,
        INLINE_RESPONSE_MAX,
        parking,
    );
    match started {
        Some(pending) => Ok(Inline(shared.boxes.boxed(Running { job, pending }))),
        None => Err(job),
    }
}

/// The cheap checks of PROTOCOL §6–§7, done before a request is queued.
fn validate(
    req: &RequestFrame,
    upload: bool,
    allowed: &[String],
    limits: &Limits,
) -> Result<(), (ErrorCode, String)> {
    check_request_limits(req, limits)?;
    let bad = |message: &str| Err((ErrorCode::BadRequest, message.to_owned()));
    match (upload, req.length) {
        (false, Some(_)) => return bad("length belongs to request.start, not request"),
        (true, None) => return bad("request.start needs the body's length"),
        (true, Some(_)) if req.body.is_some() => {
            return bad("request.start carries no body: send it in request.chunk frames");
        }
        (true, Some(len)) if len > limits.max_upload || usize::try_from(len).is_err() => {
            let message = format!("body larger than {} bytes", limits.max_upload);
            return Err((ErrorCode::TooLarge, message));
        }
        _ => {}
    }
    if !METHODS.contains(&req.method.as_str()) {
        return Err((
            ErrorCode::BadRequest,
            format!(
                "method {} is not forwarded (use one of {})",
                crate::protocol::shown(&req.method),
                METHODS.join(", ")
            ),
        ));
    }
    check_path(&req.path, allowed).map_err(|m| (ErrorCode::ForbiddenPath, m))?;
    for (name, value) in &req.headers {
        check_header(name, value).map_err(|m| (ErrorCode::BadRequest, m))?;
    }
    Ok(())
}

/// The request body as sent to the backend, read from the frame in place: base64 is decoded
/// chunk by chunk while it is written (see [`Body`]), never held decoded whole.
fn request_body<'a>(req: &'a RequestFrame, limits: &Limits) -> Result<Body<'a>, Fail> {
    let body = match &req.body {
        None => Body::Bytes(&[]),
        Some(b) if req.body_base64 => {
            Body::base64(b).map_err(|e| Fail::Request(e.code(), e.to_string()))?
        }
        Some(b) => Body::Bytes(b.as_bytes()),
    };
    if body.len() > limits.max_body {
        return Err(Fail::Request(
            ErrorCode::TooLarge,
            format!("body larger than {} bytes", limits.max_body),
        ));
    }
    Ok(body)
}

/// The headers sent to the backend: hop-by-hop, Host, Content-Length, any client-supplied
/// client header (an app must not speak for another) and backend key header (the client adds
/// the key itself, for the built-in backend only) dropped, ours added.
fn backend_headers(req: &RequestFrame) -> Vec<(&str, &str)> {
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(req.headers.len() + 1);
    let passed = req.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    headers.extend(passed.filter(|(n, _)| {
        !is_hop_by_hop(n) && !is_client_header(n) && !crate::backend::key::is_key_header(n)
    }));
    if let Some(client) = &req.client {
        headers.push((CLIENT_HEADER, client));
    }
    headers
}

/// Response headers for frames, taken from the response (moved, not copied): hop-by-hop
/// dropped; repeated names joined with ", " because frames carry one value per name (the first
/// spelling of the name is kept).
///
/// `Content-Length` is dropped too (the frame's body is the length), except in the answer to
/// `HEAD`, whose body is empty and whose `Content-Length` is the size a `GET` would get: the
/// one way an app learns a size without fetching it.
fn frame_headers(method: &str, headers: Vec<(String, String)>) -> Headers {
    let head = method == "HEAD";
    let mut out: Headers = BTreeMap::new();
    for (name, value) in headers {
        if is_hop_by_hop(&name) && !(head && name.eq_ignore_ascii_case("content-length")) {
            continue;
        }
        match out.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(&name)) {
            Some((_, v)) => {
                v.push_str(", ");
                v.push_str(&value);
            }
            None => {
                out.insert(name, value);
            }
        }
    }
    out
}

/// True for content types whose bodies are sent as text when they are valid UTF-8.
fn is_textual(content_type: &str) -> bool {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let has = |part: &str| contains_ignore_ascii_case(ct, part);
    ct.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("text/"))
        || has("json")
        || has("xml")
        || has("javascript")
        || has("event-stream")
        || ct.eq_ignore_ascii_case("application/x-www-form-urlencoded")
}

/// The `response` frame of a response whose body is read whole.
fn whole_frame(shared: &Shared, req: &RequestFrame, resp: &mut Response) -> Result<Frame, Fail> {
    let hint = resp.body.len_hint().unwrap_or(0).min(STREAM_THRESHOLD);
    let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    resp.body
        .read_to_end(&mut bytes)
        .map_err(|e| Fail::Local(LocalError::from_io(&e, shared.client.peer())))?;
    let textual = is_textual(resp.header("content-type").unwrap_or(""));
    let (body, body_base64) = match String::from_utf8(bytes) {
        // An empty body is plain "" whatever its type.
        Ok(text) if textual || text.is_empty() => (text, false),
        Ok(text) => (base64_simd::STANDARD.encode_to_string(text), true),
        Err(e) => (base64_simd::STANDARD.encode_to_string(e.as_bytes()), true),
    };
    Ok(Frame::Response(ResponseFrame {
        id: req.id.clone(),
        client: req.client.clone(),
        conn: req.conn,
        status: resp.status,
        headers: frame_headers(&req.method, std::mem::take(&mut resp.headers)),
        body,
        body_base64,
    }))
}

/// Runs the local exchange (unless an inline exchange already read the head) and sends the
/// response frames, terminal one included.
fn exchange(shared: &Shared, job: &mut Job) -> Result<(), Fail> {
    let Job { req, out, abort, response, upload } = job;
    let mut resp = match response.take() {
        Some(resp) => resp,
        None => {
            let pouring;
            let body = match upload {
                Some(upload) => {
                    pouring = Pouring {
                        upload,
                        id: &req.id,
                        client: req.client.as_deref(),
                        conn: req.conn,
                        out,
                        abort,
                        gap: shared.client.timeouts().body_gap,
                    };
                    // `submit_upload` checked that the length fits.
                    let len = usize::try_from(upload.len).unwrap_or(usize::MAX);
                    Body::Stream { source: &pouring, len }
                }
                None => request_body(req, &shared.limits)?,
            };
            let headers = backend_headers(req);
            shared
                .client
                .send(&req.method, &req.path, &headers, body, abort)
                .map_err(Fail::Local)?
        }
    };
    let textual = is_textual(resp.header("content-type").unwrap_or(""));
    let sse = resp.is_event_stream();
    let id = req.id.clone();
    let client = req.client.clone();
    let conn = req.conn;
    let send_json = |json: String, terminal: bool| {
        if abort.is_silenced() {
            return Err(Fail::Gone);
        }
        if terminal {
            abort.mark_finishing();
        }
        out.send(json).map_err(|_| Fail::Gone)
    };
    let send = |frame: Frame| send_json(frame.to_json(), frame.is_terminal());
    let peer = shared.client.peer().to_owned();
    let read_err = |e: std::io::Error| Fail::Local(LocalError::from_io(&e, &peer));

    let streamed = sse || resp.body.len_hint().is_none_or(|n| n > STREAM_THRESHOLD);
    if !streamed {
        let frame = whole_frame(shared, req, &mut resp)?;
        return send(frame);
    }

    send(Frame::ResponseStart {
        id: id.clone(),
        client: client.clone(),
        conn,
        status: resp.status,
        headers: frame_headers(&req.method, std::mem::take(&mut resp.headers)),
    })?;
    let text = |body: String| Frame::ResponseChunk {
        id: id.clone(),
        client: client.clone(),
        conn,
        body,
        body_base64: false,
    };
    let binary = |bytes: &[u8]| {
        // Only a frame large enough to be masked in place gives its buffer back.
        let large = bytes.len() / 3 * 4 >= LARGE_FRAME;
        let buf = if large { out.buffer() } else { String::new() };
        send_json(base64_chunk_json(buf, &id, client.as_deref(), conn, bytes), false)
    };
    let mut buf = vec![0u8; CHUNK_MAX];
    // Bytes of a UTF-8 character split across two reads, kept at the front of `buf`.
    let mut carry = 0;
    loop {
        let n = resp.body.read(&mut buf[carry..]).map_err(read_err)?;
        if n == 0 {
            if carry > 0 {
                // The body ended inside a character: pass the bytes on untouched.
                binary(&buf[..carry])?;
            }
            break;
        }
        let pending = carry + n;
        carry = 0;
        if !textual {
            binary(&buf[..pending])?;
            continue;
        }
        match std::str::from_utf8(&buf[..pending]) {
            Ok(t) => send(text(t.to_owned()))?,
            // Incomplete character at the end only: send the complete part now, keep the rest.
            Err(e) if e.error_len().is_none() => {
                let valid = e.valid_up_to();
                if valid > 0 {
                    send(text(String::from_utf8_lossy(&buf[..valid]).into_owned()))?;
                }
                buf.copy_within(valid..pending, 0);
                carry = pending - valid;
            }
            // Not UTF-8 after all: this piece goes as base64, byte-exact.
            Err(_) => binary(&buf[..pending])?,
        }
    }
    send(Frame::ResponseEnd { id: id.clone(), client: client.clone(), conn })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::local_http::test_origin::{self, Origin};
    use crate::protocol::parse_frame;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use std::net::TcpListener;
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::{Receiver, sync_channel};

    const CLIENT: &str = "hcl_0123456789abcdef";
    /// The app socket number of [`req`]'s requests, echoed on every answer.
    const CONN: u64 = 1 << 40;

    #[test]
    fn spare_boxes_are_reused_and_bounded() {
        let spares = SpareBoxes::new();
        let first = spares.boxed(String::from("one"));
        let at = std::ptr::from_ref::<String>(&first);
        assert_eq!(spares.unboxed(first), "one");
        let second = spares.boxed(String::from("two"));
        assert_eq!(std::ptr::from_ref::<String>(&second), at, "the freed box was not reused");
        assert_eq!(*second, "two");
        let many: Vec<_> = (0..SPARE_BOXES + 5).map(|i| spares.boxed(i.to_string())).collect();
        for (i, b) in many.into_iter().enumerate() {
            assert_eq!(spares.unboxed(b), i.to_string());
        }
        assert_eq!(lock(&spares.0).len(), SPARE_BOXES, "more boxes kept than the bound");
        drop(second);

        // Each value is dropped exactly once: by its taker, never by the kept box.
        let live = std::rc::Rc::new(());
        let spares = SpareBoxes::new();
        let taken = spares.unboxed(spares.boxed(live.clone()));
        assert_eq!(std::rc::Rc::strong_count(&live), 2, "the value was dropped with its box");
        drop(taken);
        assert_eq!(std::rc::Rc::strong_count(&live), 1);
        drop(spares.boxed(live.clone()));
        assert_eq!(std::rc::Rc::strong_count(&live), 1, "a value in a reused box leaked");
    }

    fn outbox(cap: usize) -> (Outbox, Receiver<String>) {
        let (tx, rx) = sync_channel(cap);
        let waker = Arc::new(crate::poll::Poller::new().unwrap());
        (Outbox::new(tx, waker), rx)
    }

    fn pool(o: &Origin, workers: usize) -> Pool {
        Pool::new(Target::new("127.0.0.1", o.port), workers, Limits::default())
    }

    fn req(id: &str, method: &str, path: &str) -> RequestFrame {
        RequestFrame {
            id: id.into(),
            client: Some(CLIENT.into()),
            conn: Some(CONN),
            method: method.into(),
            path: path.into(),
            headers: Headers::new(),
            body: None,
            body_base64: false,
            length: None,
        }
    }

    /// Frames (with arrival times) up to and including the terminal one; hard 10 s limit.
    fn collect(rx: &Receiver<String>) -> Vec<(Instant, Frame)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = rx.recv_timeout(left).expect("no terminal frame within 10 s");
            let frame = parse_frame(&text).unwrap();
            carries_conn_back(&frame);
            let terminal = frame.is_terminal();
            frames.push((Instant::now(), frame));
            if terminal {
                return frames;
            }
        }
    }

    fn only(rx: &Receiver<String>) -> Frame {
        let mut frames = collect(rx);
        assert_eq!(frames.len(), 1, "{frames:?}");
        frames.remove(0).1
    }

    fn error_code(frame: &Frame) -> ErrorCode {
        match frame {
            Frame::ResponseError { code, .. } => *code,
            other => panic!("not an error: {other:?}"),
        }
    }

    fn refused_code(text: &str) -> ErrorCode {
        let frame = parse_frame(text).unwrap();
        carries_conn_back(&frame);
        error_code(&frame)
    }

    /// Asserts that an answer carries its request's `conn` right after `client` (both absent
    /// for LAN requests): the relay routes by it.
    fn carries_conn_back(frame: &Frame) {
        let (client, conn) = match frame {
            Frame::Response(r) => (&r.client, r.conn),
            Frame::RequestAck { client, conn, .. }
            | Frame::ResponseStart { client, conn, .. }
            | Frame::ResponseChunk { client, conn, .. }
            | Frame::ResponseEnd { client, conn, .. }
            | Frame::ResponseError { client, conn, .. } => (client, *conn),
            _ => return,
        };
        assert_eq!(conn, client.as_ref().map(|_| CONN), "{frame:?}");
        if let Some(client) = client {
            let text = frame.to_json();
            let stamp = format!(r#""client":"{client}","conn":{CONN}"#);
            let after = text.find(&stamp).map(|at| &text[at + stamp.len()..]);
            assert!(after.is_some_and(|a| a.starts_with([',', '}'])), "{text}");
        }
    }

    /// The streamed body: (chunks as bytes, status).
    fn streamed(frames: &[(Instant, Frame)]) -> (Vec<Vec<u8>>, u16) {
        let Frame::ResponseStart { status, .. } = &frames[0].1 else {
            panic!("not streamed: {:?}", frames[0].1)
        };
        assert!(matches!(frames.last().unwrap().1, Frame::ResponseEnd { .. }));
        let chunks = frames[1..frames.len() - 1]
            .iter()
            .map(|(_, f)| match f {
                Frame::ResponseChunk { body, body_base64: true, .. } => {
                    STANDARD.decode(body).unwrap()
                }
                Frame::ResponseChunk { body, .. } => body.as_bytes().to_vec(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (chunks, *status)
    }

    fn wait_closed(p: &Pool) {
        wait_open(p, 0);
    }

    /// Waits (bounded) until exactly `n` requests are open.
    fn wait_open(p: &Pool, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.open_requests() != n {
            assert!(Instant::now() < deadline, "requests still open");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The rules a `request.chunk` must keep, piece by piece (PROTOCOL §5.2).
    #[test]
    fn upload_pieces_keep_to_the_length_the_window_and_the_smallest_chunk() {
        let len = 3 * UPLOAD_WINDOW;
        let fresh = || Upload { state: Mutex::default(), arrived: Condvar::new(), len };
        let text = |n: u64| SharedStr::from("x".repeat(n as usize));
        let broken = |u: &Upload| u.broken().unwrap_or_default();
        let min = UPLOAD_MIN_CHUNK;

        // Up to the window, in pieces of the smallest size, is taken as it comes.
        let u = fresh();
        for _ in 0..UPLOAD_WINDOW / min {
            assert!(u.push(text(min), false), "{}", broken(&u));
        }
        assert_eq!(lock(&u.state).pieces.len() as u64, UPLOAD_WINDOW / min);
        // One byte more than the window is not, until the backend has taken some.
        assert!(!u.push(text(min), false));
        assert!(broken(&u).contains("ahead of request.ack"), "{}", broken(&u));
        // Once broken, later pieces are ignored (the request is being answered).
        assert!(u.push(text(min), false));
        let u = fresh();
        for _ in 0..UPLOAD_WINDOW / min {
            assert!(u.push(text(min), false));
        }
        lock(&u.state).taken = min;
        assert!(u.push(text(min), false), "{}", broken(&u));
        assert!(!u.push(text(min), false), "the window counts from what was taken");

        // Empty and tiny pieces are refused, except a small last one.
        let u = fresh();
        assert!(!u.push(text(0), false));
        assert!(broken(&u).contains("no bytes"), "{}", broken(&u));
        let u = fresh();
        assert!(!u.push(text(min - 1), false));
        assert!(broken(&u).contains("at least"), "{}", broken(&u));
        let u = Upload { len: min + 5, ..fresh() };
        assert!(u.push(text(min), false));
        assert!(u.push(text(5), false), "a small last piece: {}", broken(&u));
        // Nothing past the length, not even one byte.
        assert!(!u.push(text(1), false));
        assert!(broken(&u).contains("more than the"), "{}", broken(&u));

        // Base64 counts decoded bytes; text that is not base64 is refused.
        let u = Upload { len: 3 * min, ..fresh() };
        assert!(u.push(STANDARD.encode(vec![1u8; 3 * min as usize]).into(), true));
        assert_eq!(lock(&u.state).received, 3 * min);
        let u = fresh();
        assert!(!u.push("Q".into(), true));
        assert!(broken(&u).contains("base64"), "{}", broken(&u));
    }

    /// A `request.start` is refused like a `request`: a duplicate id gets `BAD_FRAME` and
    /// leaves the open upload alone; uploads beyond [`MAX_UPLOADS`] get `BUSY`.
    #[test]
    fn upload_starts_are_refused_like_requests_and_capped() {
        let o = test_origin::start();
        let p = pool(&o, 4);
        let (out, rx) = outbox(64);
        let start =
            |id: &str| RequestFrame { length: Some(1 << 20), ..req(id, "POST", "/api/echo") };
        for i in 0..MAX_UPLOADS.1 {
            p.submit_upload(start(&format!("u{i}")), out.clone()).unwrap();
        }
        let dup = p.submit_upload(start("u0"), out.clone()).unwrap_err();
        assert!(dup.contains("BAD_FRAME"), "{dup}");
        let over = p.submit_upload(start("u-extra"), out.clone()).unwrap_err();
        assert_eq!(refused_code(&over), ErrorCode::Busy, "{over}");
        // Checks that need the request open come after the duplicate check.
        let no_len = RequestFrame { length: None, ..start("u1") };
        assert!(p.submit_upload(no_len, out.clone()).unwrap_err().contains("BAD_FRAME"));
        // `length` on a plain request is refused.
        let plain = RequestFrame { length: Some(3), ..req("plain", "GET", "/api/health") };
        assert_eq!(refused_code(&p.submit(plain, out.clone()).unwrap_err()), ErrorCode::BadRequest);
        assert_eq!(p.open_requests(), MAX_UPLOADS.1, "the refusals left the open uploads alone");
        // A piece that breaks the rules answers its upload at once, queued or running.
        p.upload_chunk(Some(CLIENT), "u3", "".into(), false);
        let f = only(&rx);
        assert_eq!((f.request_id(), error_code(&f)), (Some("u3"), ErrorCode::BadRequest), "{f:?}");
        p.cancel_client(CLIENT);
        wait_closed(&p);
    }

    #[test]
    fn text_round_trip_echoes_client() {
        let o = test_origin::start();
        let p = pool(&o, 4);
        let (out, rx) = outbox(64);
        let mut r = req("t1", "POST", "/api/echo");
        r.headers.insert("Content-Type".into(), "application/json; charset=utf-8".into());
        r.body = Some(r#"{"text":"grüß dich ✓"}"#.into());
        p.submit(r, out).unwrap();
        let Frame::Response(resp) = only(&rx) else { panic!("not a whole response") };
        assert_eq!(resp.id, "t1");
        assert_eq!((resp.client.as_deref(), resp.conn), (Some(CLIENT), Some(CONN)));
        assert_eq!(resp.status, 200);
        assert!(!resp.body_base64);
        assert_eq!(resp.body, r#"{"text":"grüß dich ✓"}"#);
        assert_eq!(resp.headers.get("X-Echo-Client").map(String::as_str), Some(CLIENT));
        assert_eq!(resp.headers.get("Set-Cookie").map(String::as_str), Some("a=1, b=2"));
        assert!(!resp.headers.contains_key("Content-Length"));
        // The request is forgotten right after its terminal frame was queued.
        wait_closed(&p);

        // LAN sockets: no client, no client header, nothing echoed.
        let (out, rx) = outbox(64);
        let mut r = req("t2", "POST", "/api/echo");
        (r.client, r.conn) = (None, None);
        r.body = Some("plain".into());
        r.headers.insert("content-type".into(), "text/plain".into());
        p.submit(r, out).unwrap();
        let Frame::Response(resp) = only(&rx) else { panic!("not a whole response") };
        assert_eq!(resp.client, None);
        assert_eq!(resp.headers.get("X-Echo-Client").map(String::as_str), Some("-"));
        assert_eq!(resp.body, "plain");
    }

    #[test]
    fn binary_round_trip_is_byte_exact() {
        let o = test_origin::start();
        let p = pool(&o, 4);
        let (out, rx) = outbox(64);
        let data = test_origin::noise(3 << 20, 42);
        let mut r = req("b1", "POST", "/api/echo");
        r.headers.insert("Content-Type".into(), "application/octet-stream".into());
        r.body = Some(STANDARD.encode(&data).into());
        r.body_base64 = true;
        p.submit(r, out).unwrap();
        let frames = collect(&rx);
        let (chunks, status) = streamed(&frames);
        assert_eq!(status, 200);
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= CHUNK_MAX));
        assert_eq!(chunks.concat(), data);

        // 1 MiB with Content-Length over the threshold is streamed as base64 too.
        let (out, rx) = outbox(64);
        p.submit(req("b2", "GET", "/api/big"), out).unwrap();
        let (chunks, _) = streamed(&collect(&rx));
        assert_eq!(chunks.concat(), test_origin::noise(1 << 20, 7));

        // Invalid base64 is the request's fault.
        let (out, rx) = outbox(64);
        let mut r = req("b3", "POST", "/api/echo");
        r.body = Some("not base64!".into());
        r.body_base64 = true;
        p.submit(r, out).unwrap();
        assert_eq!(error_code(&only(&rx)), ErrorCode::BadRequest);
    }

    #[test]
    fn sse_leaves_event_by_event() {
        let o = test_origin::start();
        let p = pool(&o, 4);
        let (out, rx) = outbox(64);
        let t0 = Instant::now();
        p.submit(req("s1", "GET", "/api/sse"), out).unwrap();
        let frames = collect(&rx);
        let (chunks, _) = streamed(&frames);
        assert!(chunks.len() >= 5, "{} chunks", chunks.len());
        let text = String::from_utf8(chunks.concat()).unwrap();
        for i in 0..5 {
            assert!(text.contains(&format!("data: {{\"n\":{i}}}")));
        }
        // Not base64: event streams stay readable.
        assert!(
            frames
                .iter()
                .all(|(_, f)| !matches!(f, Frame::ResponseChunk { body_base64: true, .. }))
        );
        let first_chunk = frames[1].0;
        let end = frames.last().unwrap().0;
        assert!(end.duration_since(first_chunk) >= Duration::from_millis(300));
        assert!(first_chunk.duration_since(t0) < Duration::from_millis(200));
    }

    #[test]
    fn utf8_split_across_reads_survives() {
        let o = test_origin::start();
        let p = pool(&o, 2);
        let (out, rx) = outbox(64);
        p.submit(req("u1", "GET", "/api/utf8"), out).unwrap();
        let frames = collect(&rx);
        let (chunks, _) = streamed(&frames);
        assert!(chunks.len() >= 3, "{chunks:?}");
        assert!(
            frames
                .iter()
                .all(|(_, f)| !matches!(f, Frame::ResponseChunk { body_base64: true, .. }))
        );
        assert_eq!(String::from_utf8(chunks.concat()).unwrap(), test_origin::UTF8_TEXT);
    }

    #[test]
    fn forbidden_paths_and_bad_requests_are_refused_at_submit() {
        let o = test_origin::start();
        let p = pool(&o, 1);
        for path in ["/admin", "/api/../x", "//x", "/api/%2e%2e/x", "http://evil/api/"] {
            let (out, _rx) = outbox(4);
            let refused = p.submit(req("f", "GET", path), out).unwrap_err();
            assert_eq!(refused_code(&refused), ErrorCode::ForbiddenPath, "{path}");
        }
        let mut r = req("h1", "GET", "/api/health");
        r.headers.insert("X-Evil".into(), "a\r\nHost: evil".into());
        assert_eq!(refused_code(&p.submit(r, outbox(4).0).unwrap_err()), ErrorCode::BadRequest);
        let mut r = req("h2", "GET", "/api/health");
        r.headers.insert("Bad Name".into(), "v".into());
        assert_eq!(refused_code(&p.submit(r, outbox(4).0).unwrap_err()), ErrorCode::BadRequest);
        let r = req("h3", "CONNECT", "/api/health");
        assert_eq!(refused_code(&p.submit(r, outbox(4).0).unwrap_err()), ErrorCode::BadRequest);
        let mut r = req("h4", "POST", "/api/echo");
        r.body = Some("x".repeat(Limits::default().max_body + 1).into());
        assert_eq!(refused_code(&p.submit(r, outbox(4).0).unwrap_err()), ErrorCode::TooLarge);
        assert_eq!(o.accepted.load(Ordering::SeqCst), 0);
        assert_eq!(p.open_requests(), 0);
    }

    #[test]
    fn hop_by_hop_and_host_are_dropped() {
        let o = test_origin::start();
        let p = pool(&o, 2);
        let (out, rx) = outbox(16);
        let mut r = req("hh", "GET", "/api/headers");
        for (n, v) in [
            ("Connection", "close, X-Custom"),
            ("Keep-Alive", "timeout=5"),
            ("Host", "evil.example"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "99"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Upgrade", "websocket"),
            ("TE", "trailers"),
            ("X-HermesChat-Client", "hcl_ffffffffffffffff"),
            ("X-Custom", "1"),
            ("Authorization", "Bearer t"),
        ] {
            r.headers.insert(n.into(), v.into());
        }
        p.submit(r, out).unwrap();
        let Frame::Response(resp) = only(&rx) else { panic!("not whole") };
        let seen: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&resp.body).unwrap();
        assert_eq!(seen["host"], format!("127.0.0.1:{}", o.port));
        assert_eq!(seen["x-custom"], "1");
        assert_eq!(seen["authorization"], "Bearer t");
        assert_eq!(seen["x-hermeschat-client"], CLIENT);
        for gone in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "content-length",
            "proxy-authorization",
            "upgrade",
            "te",
        ] {
            assert!(!seen.contains_key(gone), "{gone} was forwarded: {seen:?}");
        }
    }

    #[test]
    fn cancel_answers_at_once_and_closes_the_backend_socket() {
        let o = test_origin::start();
        let p = pool(&o, 1);
        let (out, rx) = outbox(64);
        p.submit(req("c1", "GET", "/api/hang"), out.clone()).unwrap();
        Origin::wait_for(&o.hangs, 1);
        // A queued request (the only worker is busy) is answered at once too.
        p.submit(req("c2", "GET", "/api/health"), out.clone()).unwrap();
        let t0 = Instant::now();
        p.cancel(Some(CLIENT), "c2");
        let f = only(&rx);
        assert!(t0.elapsed() < Duration::from_millis(100), "{:?}", t0.elapsed());
        assert_eq!((f.request_id(), error_code(&f)), (Some("c2"), ErrorCode::Cancelled));

        // A duplicate id while open is a bad frame, and the open request is untouched.
        let dup = p.submit(req("c1", "GET", "/api/health"), out.clone()).unwrap_err();
        assert!(matches!(
            parse_frame(&dup).unwrap(),
            Frame::Error { code: ErrorCode::BadFrame, .. }
        ));
        wait_open(&p, 1);
        // Cancelling another client's id does nothing.
        p.cancel(Some("hcl_ffffffffffffffff"), "c1");
        p.cancel(None, "c1");
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());

        let t0 = Instant::now();
        p.cancel(Some(CLIENT), "c1");
        let f = only(&rx);
        assert!(t0.elapsed() < Duration::from_millis(100), "{:?}", t0.elapsed());
        assert_eq!((f.request_id(), error_code(&f)), (Some("c1"), ErrorCode::Cancelled));
        Origin::wait_for(&o.hang_closed, 1);
        wait_closed(&p);
        // The id is free again.
        p.submit(req("c1", "GET", "/api/health"), out).unwrap();
        assert!(matches!(only(&rx), Frame::Response(_)));
    }

    #[test]
    fn client_disconnect_and_relay_loss_drop_requests_silently() {
        let o = test_origin::start();
        let p = pool(&o, 4);
        let (out, rx) = outbox(64);
        p.submit(req("a", "GET", "/api/hang"), out.clone()).unwrap();
        let mut other = req("b", "GET", "/api/hang");
        other.client = Some("hcl_ffffffffffffffff".into());
        p.submit(other, out.clone()).unwrap();
        Origin::wait_for(&o.hangs, 2);
        // The app left: its request is aborted and forgotten at once, without a frame...
        p.cancel_client(CLIENT);
        assert_eq!(p.open_requests(), 1);
        // ...so the reconnected app may reuse the id immediately and gets its own answer.
        p.submit(req("a", "GET", "/api/health"), out.clone()).unwrap();
        let f = only(&rx);
        assert_eq!(f.request_id(), Some("a"));
        assert!(matches!(f, Frame::Response(ResponseFrame { status: 200, .. })), "{f:?}");
        // The relay socket was lost: everything else is dropped silently too.
        p.cancel_all();
        assert_eq!(p.open_requests(), 0);
        Origin::wait_for(&o.hang_closed, 2);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "no frame may follow");
    }

    #[test]
    fn an_id_is_reusable_as_soon_as_its_terminal_frame_arrives() {
        // The app may reuse an id the moment the terminal frame reaches it, before the worker
        // has forgotten the request: that must never look like a duplicate. Many apps at once
        // widen the window (the benchmark that found this hung 7 of 16 apps).
        let o = test_origin::start();
        let p = Arc::new(pool(&o, 8));
        let apps: Vec<_> = (0..8)
            .map(|n| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let (out, rx) = outbox(64);
                    for _ in 0..300 {
                        let mut r = req("same", "GET", "/api/health");
                        r.client = Some(format!("hcl_{n:016x}"));
                        p.submit(r, out.clone()).unwrap();
                        let f = only(&rx);
                        assert!(
                            matches!(f, Frame::Response(ResponseFrame { status: 200, .. })),
                            "{f:?}"
                        );
                    }
                })
            })
            .collect();
        for a in apps {
            a.join().unwrap();
        }
    }

    #[test]
    fn backend_down_or_broken_is_unreachable() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let p = Pool::new(Target::new("127.0.0.1", port), 2, Limits::default());
        let (out, rx) = outbox(8);
        p.submit(req("d1", "GET", "/api/health"), out).unwrap();
        let f = only(&rx);
        assert_eq!(error_code(&f), ErrorCode::BackendUnreachable);
        let Frame::ResponseError { message, client, .. } = f else { unreachable!() };
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert_eq!(client.as_deref(), Some(CLIENT));

        let o = test_origin::start();
        let p = pool(&o, 2);
        let (out, rx) = outbox(8);
        p.submit(req("d2", "GET", "/api/close"), out).unwrap();
        assert_eq!(error_code(&only(&rx)), ErrorCode::BackendUnreachable);
    }

    #[test]
    fn busy_when_workers_and_queue_are_full() {
        let o = test_origin::start();
        let limits = Limits { max_open_per_app: 1000, ..Limits::default() };
        let p = Pool::new(Target::new("127.0.0.1", o.port), 1, limits);
        let (out, rx) = outbox(1024);
        p.submit(req("w", "GET", "/api/hang"), out.clone()).unwrap();
        Origin::wait_for(&o.hangs, 1);
        for i in 0..QUEUE_CAPACITY {
            p.submit(req(&format!("q{i}"), "GET", "/api/health"), out.clone()).unwrap();
        }
        let busy = p.submit(req("over", "GET", "/api/health"), out.clone()).unwrap_err();
        let f = parse_frame(&busy).unwrap();
        assert_eq!((f.request_id(), error_code(&f)), (Some("over"), ErrorCode::Busy));
        assert_eq!(p.open_requests(), QUEUE_CAPACITY + 1);
        // Per-app limit.
        let p2 = pool(&o, 1);
        for i in 0..Limits::default().max_open_per_app {
            p2.submit(req(&format!("p{i}"), "GET", "/api/hang"), out.clone()).unwrap();
        }
        let busy = p2.submit(req("p-over", "GET", "/api/hang"), out.clone()).unwrap_err();
        assert_eq!(refused_code(&busy), ErrorCode::Busy);
        p.cancel_all();
        p2.cancel_all();
        wait_closed(&p);
        wait_closed(&p2);
        drop(rx);
    }

    #[test]
    fn workers_start_on_demand_up_to_the_limit() {
        let o = test_origin::start();
        let p = pool(&o, 3);
        assert_eq!(p.workers_running(), 1);
        let (out, _rx) = outbox(64);
        for i in 0..5 {
            p.submit(req(&format!("w{i}"), "GET", "/api/hang"), out.clone()).unwrap();
        }
        // Three run at once, on three workers; the other two wait for one.
        Origin::wait_for(&o.hangs, 3);
        assert_eq!(p.workers_running(), 3);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(o.hangs.load(Ordering::SeqCst), 3);
        assert_eq!(p.open_requests(), 5);
        p.cancel_all();
        wait_closed(&p);
    }

    #[test]
    fn idle_workers_leave_and_idle_connections_close() {
        let o = test_origin::start();
        let idle = Duration::from_millis(500);
        // As many workers allowed as the test starts, so exactly that many run.
        let p = Pool::with_idle(Target::new("127.0.0.1", o.port), 3, Limits::default(), idle);
        let (out, rx) = outbox(64);
        for i in 0..3 {
            p.submit(req(&format!("h{i}"), "GET", "/api/hang"), out.clone()).unwrap();
        }
        Origin::wait_for(&o.hangs, 3);
        assert_eq!(p.workers_running(), 3);
        p.cancel_all();
        wait_closed(&p);
        // One exchange that ends cleanly leaves its connection in the idle pool.
        p.submit(req("k", "GET", "/api/health"), out.clone()).unwrap();
        let f = (0..4).map(|_| only(&rx)).find(|f| matches!(f, Frame::Response(_)));
        assert!(f.is_some(), "no response to k");
        assert_eq!(p.shared.client.idle_connections(), 1);
        let until = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done() {
                assert!(Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        until("the idle workers did not leave", &|| p.workers_running() == 1);
        until("the idle connection was not closed", &|| p.shared.client.idle_connections() == 0);
        // The last worker stays.
        std::thread::sleep(idle * 2);
        assert_eq!(p.workers_running(), 1);
        // The pool still serves, and grows again on demand.
        p.submit(req("again", "GET", "/api/health"), out.clone()).unwrap();
        let f = (0..4).map(|_| only(&rx)).find(|f| matches!(f, Frame::Response(_)));
        assert!(f.is_some(), "no response after the workers left");
        for i in 0..2 {
            p.submit(req(&format!("g{i}"), "GET", "/api/hang"), out.clone()).unwrap();
        }
        Origin::wait_for(&o.hangs, 5);
        assert!(p.workers_running() >= 2, "{} workers", p.workers_running());
        p.cancel_all();
        wait_closed(&p);
    }

    #[test]
    fn keep_alive_reuses_one_backend_connection() {
        let o = test_origin::start();
        let p = pool(&o, 8);
        let (out, rx) = outbox(8);
        for i in 0..10 {
            p.submit(req(&format!("k{i}"), "GET", "/api/health"), out.clone()).unwrap();
            let Frame::Response(resp) = only(&rx) else { panic!("not whole") };
            assert_eq!(resp.body, r#"{"ok":true}"#);
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn shutdown_answers_open_requests() {
        let o = test_origin::start();
        let p = pool(&o, 2);
        let (out, rx) = outbox(64);
        for id in ["x1", "x2", "x3", "x4"] {
            p.submit(req(id, "GET", "/api/hang"), out.clone()).unwrap();
        }
        Origin::wait_for(&o.hangs, 2);
        p.cancel(Some(CLIENT), "x1");
        let f = only(&rx);
        assert_eq!((f.request_id(), error_code(&f)), (Some("x1"), ErrorCode::Cancelled));
        let t0 = Instant::now();
        p.shutdown(ErrorCode::ShuttingDown);
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert_eq!(p.open_requests(), 0);
        let mut ids: Vec<String> = (0..3)
            .map(|_| {
                let f = parse_frame(&rx.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
                assert_eq!(error_code(&f), ErrorCode::ShuttingDown);
                f.request_id().unwrap().to_owned()
            })
            .collect();
        ids.sort();
        assert_eq!(ids, ["x2", "x3", "x4"]);
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        let refused = p.submit(req("late", "GET", "/api/health"), out).unwrap_err();
        assert_eq!(refused_code(&refused), ErrorCode::ShuttingDown);
        p.shutdown(ErrorCode::ShuttingDown);
    }

    /// Drives an inline request to its end on a poller of its own, as the relay I/O thread
    /// does; returns the frames it pushed.
    fn drive(p: &Pool, inline: Inline, parking: &mut Vec<Parked>) -> Vec<Frame> {
        drive_with(p, inline, parking, || {})
    }

    /// As [`drive`], running `after_write` once the first step has written the request. A
    /// connection given back to park goes to `parking`.
    fn drive_with(
        p: &Pool,
        inline: Inline,
        parking: &mut Vec<Parked>,
        after_write: impl FnOnce(),
    ) -> Vec<Frame> {
        let poller = crate::poll::Poller::new().unwrap();
        let mut pushed = Vec::new();
        let mut step = p.advance(inline, &mut |t| pushed.push(t));
        after_write();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Step::Wait(inline, interest) = step {
            let socket = inline.socket().clone();
            let ev = crate::poll::Event::new(0, true, interest == Interest::Writable);
            // SAFETY: `socket` is held until it is deleted below.
            unsafe { poller.add_with_mode(&*socket, ev, crate::poll::PollMode::Level) }.unwrap();
            let mut events = crate::poll::Events::new();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "inline request not done within 10 s");
            poller.wait(&mut events, Some(left)).unwrap();
            poller.delete(&*socket).unwrap();
            step = p.advance(inline, &mut |t| pushed.push(t));
        }
        if let Step::Done(Some(parked)) = step {
            parking.push(parked);
        }
        let frames: Vec<Frame> = pushed.iter().map(|t| parse_frame(t).unwrap()).collect();
        frames.iter().for_each(carries_conn_back);
        frames
    }

    /// Submits a request that must start inline: a kept connection is at hand.
    fn start_inline_on(
        p: &Pool,
        r: RequestFrame,
        out: &Outbox,
        parking: &mut Vec<Parked>,
    ) -> Inline {
        p.submit_inline(r, out.clone(), Some(parking)).unwrap().expect("started inline")
    }

    /// A pool whose backend connection is warm (one idle keep-alive connection).
    fn warm_pool(o: &Origin) -> Pool {
        let p = pool(o, 2);
        let (out, rx) = outbox(8);
        p.submit(req("warm", "GET", "/api/health"), out).unwrap();
        assert!(matches!(only(&rx), Frame::Response(_)));
        wait_closed(&p);
        p
    }

    #[test]
    fn inline_requests_answer_small_responses_and_hand_streams_to_workers() {
        let o = test_origin::start();
        let p = warm_pool(&o);
        let mut parking = Vec::new();
        // A small response is answered by the caller's thread, on the pooled connection.
        let (out, rx) = outbox(64);
        let mut r = req("i1", "POST", "/api/echo");
        r.headers.insert("Content-Type".into(), "text/plain".into());
        r.body = Some("inline ✓".into());
        let inline = start_inline_on(&p, r, &out, &mut parking);
        let frames = drive(&p, inline, &mut parking);
        assert_eq!(frames.len(), 1, "{frames:?}");
        let Frame::Response(resp) = &frames[0] else { panic!("not whole: {frames:?}") };
        assert_eq!((resp.id.as_str(), resp.status, resp.body.as_str()), ("i1", 200, "inline ✓"));
        assert_eq!(resp.headers.get("X-Echo-Client").map(String::as_str), Some(CLIENT));
        assert!(rx.try_recv().is_err(), "a worker answered too");
        wait_closed(&p);
        // The connection is parked for the caller, not pooled for the workers...
        assert_eq!((parking.len(), p.shared.client.idle_connections()), (1, 0));
        // Binary bodies go base64 both ways, byte-exact.
        let data = test_origin::noise(32 << 10, 3);
        let mut r = req("i2", "POST", "/api/echo");
        r.body = Some(STANDARD.encode(&data).into());
        r.body_base64 = true;
        let inline = start_inline_on(&p, r, &out, &mut parking);
        // ...and the next inline request takes it from there.
        assert!(inline.tag().is_some() && parking.is_empty());
        let Frame::Response(resp) = &drive(&p, inline, &mut parking)[0] else {
            panic!("not whole")
        };
        assert!(resp.body_base64);
        assert_eq!(STANDARD.decode(&resp.body).unwrap(), data);
        // An event stream is handed to a worker once its head is read; the worker sends every
        // frame, the terminal one included.
        let inline = start_inline_on(&p, req("i3", "GET", "/api/sse"), &out, &mut parking);
        assert!(drive(&p, inline, &mut parking).is_empty());
        let (chunks, status) = streamed(&collect(&rx));
        assert_eq!(status, 200);
        assert!(String::from_utf8(chunks.concat()).unwrap().contains("data: {\"n\":4}"));
        // So is a response over the inline limit (1 MiB, streamed as base64).
        let inline = start_inline_on(&p, req("i4", "GET", "/api/big"), &out, &mut parking);
        assert!(drive(&p, inline, &mut parking).is_empty());
        let (chunks, _) = streamed(&collect(&rx));
        assert_eq!(chunks.concat(), test_origin::noise(1 << 20, 7));
        wait_closed(&p);
        // The one warm connection served everything.
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
        // Not allowed, or no idle connection: queued for a worker as before.
        assert!(p.submit_inline(req("i5", "GET", "/api/health"), out, None).unwrap().is_none());
        assert!(matches!(only(&rx), Frame::Response(_)));
    }

    #[test]
    fn inline_cancel_shutdown_and_stale_connections() {
        let o = test_origin::start();
        let p = warm_pool(&o);
        let mut parking = Vec::new();
        let (out, rx) = outbox(64);
        // A cancel shuts the backend socket down; the next step answers CANCELLED.
        let inline = start_inline_on(&p, req("h1", "GET", "/api/hang"), &out, &mut parking);
        let frames = drive_with(&p, inline, &mut parking, || {
            Origin::wait_for(&o.hangs, 1);
            p.cancel(Some(CLIENT), "h1");
        });
        assert_eq!(frames.len(), 1);
        assert_eq!(
            (frames[0].request_id(), error_code(&frames[0])),
            (Some("h1"), ErrorCode::Cancelled)
        );
        Origin::wait_for(&o.hang_closed, 1);
        wait_closed(&p);

        // A pooled connection the backend closed while idle: a GET goes to a worker, which
        // sends it again on a fresh connection...
        let stale = || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (peer, _) = l.accept().unwrap();
            std::thread::spawn(move || {
                let mut peer = peer;
                let mut b = [0u8; 1024];
                let _ = std::io::Read::read(&mut peer, &mut b);
            });
            s
        };
        p.shared.client.push_idle(stale());
        let inline = start_inline_on(&p, req("s1", "GET", "/api/health"), &out, &mut parking);
        assert!(drive(&p, inline, &mut parking).is_empty());
        assert!(matches!(only(&rx), Frame::Response(ResponseFrame { status: 200, .. })));
        // ...but a POST is not sent twice: it fails BACKEND_UNREACHABLE.
        p.shared.client.push_idle(stale());
        let inline = start_inline_on(&p, req("s2", "POST", "/api/echo"), &out, &mut parking);
        let frames = drive(&p, inline, &mut parking);
        assert_eq!(error_code(&frames[0]), ErrorCode::BackendUnreachable);
        wait_closed(&p);

        // A parked connection the backend closed a moment ago, before the caller's poller
        // said so: a POST checks it first and goes to a worker on a fresh connection, never
        // failing...
        let once = |parking: &mut Vec<Parked>| {
            p.submit(req("w1", "GET", "/api/health"), out.clone()).unwrap();
            assert!(matches!(only(&rx), Frame::Response(_)));
            wait_closed(&p);
            let inline = start_inline_on(&p, req("o1", "GET", "/api/once"), &out, parking);
            drive(&p, inline, parking);
            assert_eq!(parking.len(), 1);
            // `/api/once` drops the connection 20 ms after answering.
            std::thread::sleep(Duration::from_millis(150));
        };
        once(&mut parking);
        let mut r = req("p1", "POST", "/api/echo");
        r.headers.insert("Content-Type".into(), "text/plain".into());
        r.body = Some("once".into());
        assert!(p.submit_inline(r, out.clone(), Some(&mut parking)).unwrap().is_none());
        let Frame::Response(resp) = only(&rx) else { panic!("not whole") };
        assert_eq!((resp.status, resp.body.as_str()), (200, "once"));
        // ...and a GET, sent without the check, is resent by a worker.
        parking.clear();
        once(&mut parking);
        let inline = start_inline_on(&p, req("g1", "GET", "/api/health"), &out, &mut parking);
        assert!(drive(&p, inline, &mut parking).is_empty());
        assert!(matches!(only(&rx), Frame::Response(ResponseFrame { status: 200, .. })));
        wait_closed(&p);

        // A bodiless answer (204 after a 100 Continue) is whole at once, its connection
        // parked like any other.
        let inline = start_inline_on(&p, req("n1", "GET", "/api/nocontent"), &out, &mut parking);
        let frames = drive(&p, inline, &mut parking);
        assert!(matches!(&frames[..], [Frame::Response(ResponseFrame { status: 204, .. })]));
        assert_eq!(parking.len(), 1);

        // A cancel that came first keeps its answer when the caller ends the request.
        let inline = start_inline_on(&p, req("c2", "GET", "/api/hang"), &out, &mut parking);
        p.cancel(Some(CLIENT), "c2");
        let mut pushed = Vec::new();
        p.end_inline(inline, ErrorCode::ShuttingDown, &mut |t| pushed.push(t));
        assert_eq!(refused_code(&pushed[0]), ErrorCode::Cancelled);

        // Shutdown: the caller ends its inline requests SHUTTING_DOWN.
        p.submit(req("w2", "GET", "/api/health"), out.clone()).unwrap();
        assert!(matches!(only(&rx), Frame::Response(_)));
        wait_closed(&p);
        let inline = start_inline_on(&p, req("x1", "GET", "/api/hang"), &out, &mut parking);
        let mut pushed = Vec::new();
        p.end_inline(inline, ErrorCode::ShuttingDown, &mut |t| pushed.push(t));
        assert_eq!(pushed.len(), 1);
        assert_eq!(refused_code(&pushed[0]), ErrorCode::ShuttingDown);
        assert_eq!(p.open_requests(), 0);
        // The id is free again at once.
        p.submit(req("x1", "GET", "/api/health"), out.clone()).unwrap();
        assert!(matches!(only(&rx), Frame::Response(_)));

        // A job handed over after the pool's threads left (a stale connection's resend, a
        // stream's hand-off) is still answered.
        p.shutdown(ErrorCode::ShuttingDown);
        let abort = Abort::new();
        abort.abort();
        p.enqueue(Job {
            req: req("late", "GET", "/api/health"),
            out,
            abort,
            response: None,
            upload: None,
        });
        assert_eq!(error_code(&only(&rx)), ErrorCode::Cancelled);
    }

    #[test]
    fn a_gone_connection_stops_the_exchange_quietly() {
        let o = test_origin::start();
        let p = pool(&o, 2);
        let (out, rx) = outbox(1);
        drop(rx);
        p.submit(req("g1", "GET", "/api/sse"), out).unwrap();
        wait_closed(&p);
    }
}
