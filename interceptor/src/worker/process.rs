//! `interceptor worker`: the Worker process's `main`.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::FileTypeExt;

use wasmtime::component::Component;

use super::runtime::{serve_channel, Limits, Worker};
use super::{engine, WorkerArgs, WorkerError};

/// The connected Unix stream socket to the dispatcher.
pub const CHANNEL_FD: RawFd = 3;
/// The read-only memfd holding the precompiled component.
pub const COMPONENT_FD: RawFd = 4;

/// Runs a Worker process until its channel closes; returns the exit code (0
/// when the dispatcher hung up, 1 when the Worker could not start or serve).
pub fn run_process(args: WorkerArgs) -> i32 {
    match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("interceptor worker {}: {e}", args.name);
            1
        }
    }
}

fn run(args: &WorkerArgs) -> Result<(), WorkerError> {
    close_other_fds();
    let channel = take_fd(CHANNEL_FD).map_err(|message| WorkerError::Channel {
        fd: CHANNEL_FD,
        message,
    })?;
    let component = take_fd(COMPONENT_FD).map_err(|message| WorkerError::ComponentFd {
        fd: COMPONENT_FD,
        message,
    })?;
    let precompiled = read_component(component).map_err(|message| WorkerError::ComponentFd {
        fd: COMPONENT_FD,
        message,
    })?;
    let channel = channel_socket(channel).map_err(|message| WorkerError::Channel {
        fd: CHANNEL_FD,
        message,
    })?;

    let engine = engine()?;
    // SAFETY: `Component::deserialize` trusts its input to be an artifact of
    // `precompile` for this very engine configuration (it maps it as code).
    // It is: the daemon, not the sandbox, compiled it with `super::engine()`
    // (now, or in an earlier run and kept in its root-only, checksummed compile
    // cache: `crate::wasm::cache`) and handed it over in a sealed memfd;
    // wasmtime still checks that the artifact's engine configuration and
    // version match before using it.
    let component = unsafe { Component::deserialize(&engine, &precompiled) }
        .map_err(|e| WorkerError::Load(format!("{e:#}")))?;
    drop(precompiled);

    // One thread: every fresh instance takes copy-on-write faults on its memory
    // image, and in a process with threads on other CPUs each fault costs a
    // TLB-shootdown IPI (a third of a JavaScript Worker's time, measured).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("worker")
        .build()
        .map_err(WorkerError::Runtime)?;
    let limits = Limits {
        cpu_ms: args.cpu_ms,
        memory_mb: args.memory_mb,
    };
    let result = runtime.block_on(async {
        let worker = Worker::new(&engine, &component, args.relay, limits)?;
        let stream =
            tokio::net::UnixStream::from_std(channel).map_err(|e| WorkerError::Channel {
                fd: CHANNEL_FD,
                message: e.to_string(),
            })?;
        tracing::debug!(worker = %args.name, "serving");
        serve_channel(worker, stream).await
    });
    // Requests still running die with the process: the dispatcher is gone.
    runtime.shutdown_background();
    match result {
        // A dispatcher that hangs up mid-frame is as gone as one that says goodbye.
        Err(WorkerError::Serve(e)) if is_hangup(&e) => Ok(()),
        other => other,
    }
}

fn is_hangup(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// Closes every descriptor above the component's: the Worker needs only
/// stdin/stdout/stderr, the channel and the component.
fn close_other_fds() {
    // SAFETY: close_range only closes descriptors; nothing in this process
    // owns any above COMPONENT_FD yet (this runs first thing in `run`).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (COMPONENT_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        tracing::debug!("close_range: {}", std::io::Error::last_os_error());
    }
}

/// Takes ownership of descriptor `fd`, which the dispatcher passed open.
fn take_fd(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "not open ({}); `interceptor worker` is started by the dispatcher",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the descriptor is open, and by the process interface it is
    // ours alone: nothing else in this process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sets close-on-exec on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

fn read_component(fd: OwnedFd) -> Result<Vec<u8>, String> {
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file (a memfd)".to_string());
    }
    let len = usize::try_from(meta.len()).map_err(|e| e.to_string())?;
    let mut bytes = vec![0; len];
    // Positioned reads: whatever the descriptor's offset, read it all.
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| format!("reading it: {e}"))?;
    Ok(bytes)
}

fn channel_socket(fd: OwnedFd) -> Result<std::os::unix::net::UnixStream, String> {
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.file_type().is_socket() {
        return Err("not a socket".to_string());
    }
    let stream = std::os::unix::net::UnixStream::from(OwnedFd::from(file));
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(stream)
}
