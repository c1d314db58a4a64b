//! Background block jobs of the daemon (issue #14): a live commit, stream or mirror runs on
//! its own thread while the control socket answers at once with the job's ID; `xdisk jobs`
//! lists the jobs, `xdisk job cancel|pause|resume|complete ID` steers them.
//!
//! A job copies in bounded chunks and calls [`Job::checkpoint`] between two chunks (never
//! with the device's queues paused): there it yields to the guest's requests, sleeps to
//! honour its rate limit, waits while it is paused and stops when it is cancelled. The
//! registry keeps every running job and the last [`HISTORY`] finished ones.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::control::{BackupReply, CommitReply, MirrorReply, StreamReply};

pub(crate) mod run;

/// What a completed job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A commit's result.
    Commit(CommitReply),
    /// A stream's result.
    Stream(StreamReply),
    /// A mirror's result.
    Mirror(MirrorReply),
    /// A backup's result (it ended with `xdisk backup --finish`).
    Backup(BackupReply),
}

/// Finished jobs remembered by the registry.
pub const HISTORY: usize = 64;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// A live commit of the active layer (`xdisk commit`).
    Commit,
    /// A live stream of backing data into the top (`xdisk stream`).
    Stream,
    /// A live mirror of the disk to another image (`xdisk mirror`).
    Mirror,
    /// A point-in-time view of the disk exported over NBD (`xdisk backup`), until
    /// `xdisk backup --finish`.
    Backup,
}

impl JobKind {
    /// The kind's name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Commit => "commit",
            JobKind::Stream => "stream",
            JobKind::Mirror => "mirror",
            JobKind::Backup => "backup",
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Copying.
    Running,
    /// Paused by `xdisk job pause` (it stops at its next chunk boundary).
    Paused,
    /// A mirror that converged: it keeps copying the guest's writes and waits for
    /// `xdisk job complete` to switch the device over.
    Ready,
    /// Done.
    Completed,
    /// Stopped by an error (see [`JobInfo::error`]).
    Failed,
    /// Stopped by `xdisk job cancel`.
    Cancelled,
}

impl JobState {
    /// The state's name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Ready => "ready",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended.
    pub fn finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A job as `xdisk jobs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Its ID (unique within the daemon's life).
    pub id: u64,
    /// What it does.
    pub kind: JobKind,
    /// The device (`qdisk/5/51712`).
    pub device: String,
    /// Where it is.
    pub state: JobState,
    /// Bytes copied so far.
    pub done_bytes: u64,
    /// Bytes to copy as known now (a live copy finds more as the guest writes).
    pub total_bytes: u64,
    /// The rate limit in bytes per second (0: none).
    pub speed: u64,
    /// Whether a mirror switches over by itself once ready (`--pivot`, or `xdisk job
    /// complete`); absent for the other kinds (a backup's finish is not a switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pivot: Option<bool>,
    /// Milliseconds since it started (until it finished).
    pub elapsed_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A completed commit's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitReply>,
    /// A completed stream's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamReply>,
    /// A completed mirror's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorReply>,
    /// A backup: what it exports and how far its copy-before-write got (while it runs),
    /// its result (once finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupReply>,
}

/// Why a job stopped at a [`Job::checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the job was cancelled")]
pub struct Cancelled;

struct State {
    state: JobState,
    cancel: bool,
    /// `xdisk job complete` (or `--pivot`): a ready mirror switches the device over.
    complete: bool,
    /// Paused while ready: back to ready on resume.
    was_ready: bool,
    done: u64,
    total: u64,
    error: Option<String>,
    outcome: Option<Outcome>,
    /// A running backup's report.
    backup: Option<BackupReply>,
    finished: Option<Instant>,
    /// The rate limit in bytes per second (0: none); `xdisk job set-speed` changes it.
    speed: u64,
    /// The rate limit's window: bytes copied since `window_start`.
    window_bytes: u64,
    window_start: Instant,
}

/// One job.
pub struct Job {
    id: u64,
    kind: JobKind,
    device: String,
    started: Instant,
    st: Mutex<State>,
    cv: Condvar,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Job {
    /// Its ID.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its report.
    pub fn info(&self) -> JobInfo {
        let s = lock(&self.st);
        let end = s.finished.unwrap_or_else(Instant::now);
        JobInfo {
            id: self.id,
            kind: self.kind,
            device: self.device.clone(),
            state: s.state,
            done_bytes: s.done,
            total_bytes: s.total.max(s.done),
            speed: s.speed,
            pivot: (self.kind == JobKind::Mirror).then_some(s.complete),
            elapsed_ms: u64::try_from(end.duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX),
            error: s.error.clone(),
            commit: match &s.outcome {
                Some(Outcome::Commit(c)) => Some(c.clone()),
                _ => None,
            },
            stream: match &s.outcome {
                Some(Outcome::Stream(r)) => Some(r.clone()),
                _ => None,
            },
            mirror: match &s.outcome {
                Some(Outcome::Mirror(r)) => Some(r.clone()),
                _ => None,
            },
            backup: match &s.outcome {
                Some(Outcome::Backup(r)) => Some(r.clone()),
                _ => s.backup.clone(),
            },
        }
    }

    /// Its kind.
    pub fn kind(&self) -> JobKind {
        self.kind
    }

    /// Sets the bytes done (a backup: old data saved so far) and a running backup's report.
    pub fn set_progress(&self, done: u64, backup: Option<BackupReply>) {
        let mut s = lock(&self.st);
        s.done = done;
        if backup.is_some() {
            s.backup = backup;
        }
    }

    /// Adds bytes found to copy.
    pub fn add_total(&self, bytes: u64) {
        let mut s = lock(&self.st);
        s.total = s.total.saturating_add(bytes);
    }

    /// Whether it was cancelled.
    pub fn cancelled(&self) -> bool {
        lock(&self.st).cancel
    }

    /// Called between two chunks of a copy (never with the device's queues paused), after
    /// `bytes` more were copied: yields to the guest's requests, sleeps as long as the rate
    /// limit wants, waits while the job is paused; fails once it is cancelled.
    pub fn checkpoint(&self, bytes: u64) -> Result<(), Cancelled> {
        std::thread::yield_now();
        let mut s = lock(&self.st);
        s.done = s.done.saturating_add(bytes);
        s.window_bytes = s.window_bytes.saturating_add(bytes);
        loop {
            if s.cancel {
                return Err(Cancelled);
            }
            if s.state == JobState::Paused {
                s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
                // No burst after a pause.
                s.window_bytes = 0;
                s.window_start = Instant::now();
                continue;
            }
            if s.speed == 0 {
                return Ok(());
            }
            let due =
                s.window_start + Duration::from_secs_f64(s.window_bytes as f64 / s.speed as f64);
            let now = Instant::now();
            if now >= due {
                return Ok(());
            }
            s = self
                .cv
                .wait_timeout(s, due - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Marks the job ready (a converged mirror), unless paused.
    pub fn set_ready(&self) {
        let mut s = lock(&self.st);
        if s.state == JobState::Running {
            s.state = JobState::Ready;
        }
        s.was_ready = true;
    }

    /// Asks a job to complete as soon as it is ready (`--pivot`).
    pub fn request_complete(&self) {
        lock(&self.st).complete = true;
        self.cv.notify_all();
    }

    /// Waits at most `timeout` for a completion request (true), a cancel (an error) or
    /// the timeout (false); a pause holds it until resumed.
    pub fn wait_complete(&self, timeout: Duration) -> Result<bool, Cancelled> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.st);
        loop {
            if s.cancel {
                return Err(Cancelled);
            }
            if s.state == JobState::Paused {
                s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if s.complete {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Changes the rate limit (bytes per second, 0: none) from now on, as QEMU's
    /// `block-job-set-speed`: the copy goes at the new speed from its next chunk (a wait for
    /// the old one ends early), with no burst to make up for the time at the old one.
    pub fn set_speed(&self, speed: u64) -> crate::Result<()> {
        let mut s = lock(&self.st);
        if s.state.finished() {
            return Err(crate::Error::Invalid(format!(
                "job {} is {}",
                self.id,
                s.state.as_str()
            )));
        }
        s.speed = speed;
        s.window_bytes = 0;
        s.window_start = Instant::now();
        self.cv.notify_all();
        Ok(())
    }

    /// Ends the job: completed (with its result), failed or, if it was cancelled,
    /// cancelled.
    pub fn finish(&self, r: std::result::Result<Outcome, String>) {
        let mut s = lock(&self.st);
        match r {
            Ok(c) => {
                s.state = JobState::Completed;
                s.outcome = Some(c);
                s.total = s.total.max(s.done);
            }
            Err(_) if s.cancel => s.state = JobState::Cancelled,
            Err(e) => {
                s.state = JobState::Failed;
                s.error = Some(e);
            }
        }
        s.finished = Some(Instant::now());
        self.cv.notify_all();
    }

    fn control(&self, action: JobAction) -> crate::Result<()> {
        let mut s = lock(&self.st);
        if s.state.finished() {
            return Err(crate::Error::Invalid(format!(
                "job {} is {}",
                self.id,
                s.state.as_str()
            )));
        }
        match action {
            JobAction::Cancel => s.cancel = true,
            JobAction::Pause | JobAction::Resume if self.kind == JobKind::Backup => {
                return Err(crate::Error::Invalid(format!(
                    "job {} is a backup: it copies nothing by itself, there is nothing to {} \
                     (xdisk backup DEV --finish ends it)",
                    self.id,
                    action.as_str()
                )));
            }
            JobAction::Pause => {
                if matches!(s.state, JobState::Running | JobState::Ready) {
                    s.state = JobState::Paused;
                }
            }
            JobAction::Resume => {
                if s.state == JobState::Paused {
                    s.state = if s.was_ready {
                        JobState::Ready
                    } else {
                        JobState::Running
                    };
                }
            }
            JobAction::Complete if self.kind == JobKind::Backup => s.complete = true,
            JobAction::Complete => {
                if self.kind != JobKind::Mirror {
                    return Err(crate::Error::Invalid(format!(
                        "job {} is a {}: only a mirror (or a backup) is completed",
                        self.id,
                        self.kind.as_str()
                    )));
                }
                if s.state != JobState::Ready {
                    return Err(crate::Error::Invalid(format!(
                        "job {} is {}, not ready: it completes once its copy has converged",
                        self.id,
                        s.state.as_str()
                    )));
                }
                s.complete = true;
            }
        }
        self.cv.notify_all();
        Ok(())
    }
}

/// What `xdisk job` does to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobAction {
    /// Stops it; what it did is left consistent (a commit leaves the device on its top and
    /// removes its temporary bitmap).
    Cancel,
    /// Stops copying at the next chunk boundary until resumed.
    Pause,
    /// Goes on after a pause.
    Resume,
    /// Switches the device of a ready mirror over to its target.
    Complete,
}

impl JobAction {
    /// The action's name, as in the JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            JobAction::Cancel => "cancel",
            JobAction::Pause => "pause",
            JobAction::Resume => "resume",
            JobAction::Complete => "complete",
        }
    }
}

/// The daemon's jobs.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

impl Jobs {
    /// A new job (running), registered.
    pub fn create(&self, kind: JobKind, device: &str, speed: u64, total: u64) -> Arc<Job> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let job = Arc::new(Job {
            id,
            kind,
            device: device.to_owned(),
            started: now,
            st: Mutex::new(State {
                state: JobState::Running,
                cancel: false,
                complete: false,
                was_ready: false,
                done: 0,
                total,
                error: None,
                outcome: None,
                backup: None,
                finished: None,
                speed,
                window_bytes: 0,
                window_start: now,
            }),
            cv: Condvar::new(),
        });
        let mut jobs = lock(&self.jobs);
        jobs.insert(id, job.clone());
        // Forget the oldest finished jobs beyond HISTORY.
        let finished: Vec<u64> = jobs
            .iter()
            .filter(|(_, j)| lock(&j.st).state.finished())
            .map(|(id, _)| *id)
            .collect();
        for id in finished.iter().take(finished.len().saturating_sub(HISTORY)) {
            jobs.remove(id);
        }
        job
    }

    /// Runs `f` on a new thread for `job`.
    pub fn spawn(&self, job: &Arc<Job>, f: impl FnOnce() + Send + 'static) -> crate::Result<()> {
        let t = std::thread::Builder::new()
            .name(format!("xdisk-job-{}", job.id))
            .spawn(f)
            .map_err(|e| crate::Error::io("cannot start a job thread", e))?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(t);
        Ok(())
    }

    /// Every job known, by ID.
    pub fn list(&self) -> Vec<JobInfo> {
        let jobs: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        jobs.iter().map(|j| j.info()).collect()
    }

    /// One job.
    pub fn get(&self, id: u64) -> crate::Result<Arc<Job>> {
        lock(&self.jobs)
            .get(&id)
            .cloned()
            .ok_or_else(|| crate::Error::Invalid(format!("no job {id} (xdisk jobs lists them)")))
    }

    /// Cancels, pauses or resumes a job; returns it as it is then.
    pub fn control(&self, id: u64, action: JobAction) -> crate::Result<JobInfo> {
        let job = self.get(id)?;
        job.control(action)?;
        Ok(job.info())
    }

    /// Changes a job's rate limit (see [`Job::set_speed`]); returns it as it is then.
    pub fn set_speed(&self, id: u64, speed: u64) -> crate::Result<JobInfo> {
        let job = self.get(id)?;
        job.set_speed(speed)?;
        Ok(job.info())
    }

    /// Cancels the jobs of `device` (a device that stops) and waits, at most `timeout`, for
    /// each to end (the job's images are then closed before the device's image is opened
    /// again).
    pub fn cancel_device(&self, device: &str, timeout: Duration) {
        let jobs: Vec<Arc<Job>> = lock(&self.jobs)
            .values()
            .filter(|j| j.device == device)
            .cloned()
            .collect();
        for j in &jobs {
            if j.control(JobAction::Cancel).is_ok() {
                tracing::info!(device, job = j.id, "the device stops: its job is cancelled");
            }
        }
        let deadline = Instant::now() + timeout;
        for j in &jobs {
            let mut s = lock(&j.st);
            while !s.state.finished() {
                let now = Instant::now();
                if now >= deadline {
                    tracing::warn!(device, job = j.id, "the job does not end");
                    break;
                }
                s =
                    j.cv.wait_timeout(s, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
            }
        }
    }

    /// Cancels every running job and waits for their threads (each leaves its images
    /// consistent).
    pub fn cancel_all(&self) {
        let jobs: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        for j in &jobs {
            let _ = j.control(JobAction::Cancel);
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_speed_changes_the_limit_of_a_running_job() {
        let jobs = Jobs::default();
        // 1 MiB at 1 MiB/s would take a second.
        let j = jobs.create(JobKind::Mirror, "qdisk/1/2", 1 << 20, 1 << 20);
        j.checkpoint(256 << 10).unwrap();
        let j2 = j.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            for _ in 0..3 {
                j2.checkpoint(256 << 10).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        // No limit: the waiting checkpoint ends now, the rest go at once.
        assert_eq!(jobs.set_speed(j.id(), 0).unwrap().speed, 0);
        h.join().unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // 4 MiB/s: 1 MiB more takes about 250 ms.
        jobs.set_speed(j.id(), 4 << 20).unwrap();
        let t = Instant::now();
        for _ in 0..4 {
            j.checkpoint(256 << 10).unwrap();
        }
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(j.info().speed, 4 << 20);
        assert!(jobs.set_speed(99, 0).is_err());
    }

    #[test]
    fn checkpoint_honours_speed_pause_and_cancel() {
        let jobs = Jobs::default();
        let j = jobs.create(JobKind::Commit, "qdisk/1/2", 4 << 20, 1 << 20);
        let t = Instant::now();
        for _ in 0..4 {
            j.checkpoint(256 << 10).unwrap();
        }
        // 1 MiB at 4 MiB/s: 250 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        jobs.control(j.id(), JobAction::Pause).unwrap();
        assert_eq!(j.info().state, JobState::Paused);
        let j2 = j.clone();
        let h = std::thread::spawn(move || j2.checkpoint(0));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!h.is_finished());
        jobs.control(j.id(), JobAction::Cancel).unwrap();
        assert_eq!(h.join().unwrap(), Err(Cancelled));
        j.finish(Err("cancelled".into()));
        let i = j.info();
        assert_eq!(i.state, JobState::Cancelled);
        assert_eq!(i.done_bytes, 1 << 20);
        assert!(jobs.control(j.id(), JobAction::Resume).is_err());
        assert!(jobs.control(99, JobAction::Cancel).is_err());
        assert!(jobs.set_speed(j.id(), 1).is_err(), "a finished job's speed");
        assert_eq!(jobs.list().len(), 1);
    }
}
