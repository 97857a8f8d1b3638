/**
 * systemd's readiness protocol for `cryptmap daemon`, `agent` and `keyd` (issue 18; sd_notify(3),
 * sd_listen_fds(3), systemd.service(5) `Type=notify`, `WatchdogSec=`): newline-separated KEY=VALUE
 * assignments, one datagram each, on the AF_UNIX socket $NOTIFY_SOCKET names ('/path' or '@abstract').
 * Node has no Unix datagram sockets: the native addon sends (native/sdnotify.c); without the addon,
 * `systemd-notify --pid=<ours>` does (the unit then needs `NotifyAccess=all`, which a warning says).
 *
 * Without NOTIFY_SOCKET every call is a no-op, so the processes run the same outside systemd. A failed
 * send is logged once and never fails the process: readiness is reporting, not function.
 *
 * Socket activation: `listenFds()` returns the descriptors systemd passed (LISTEN_PID = our pid,
 * LISTEN_FDS from fd 3, LISTEN_FDNAMES), once, and removes the variables so children do not inherit them.
 */
import { execFile } from 'node:child_process';
import { logger } from './log.js';
import { loadNative } from './native.js';

const log = logger('sd-notify');

/** What the process reports to its service manager. Every method is a no-op when not run by one. */
export interface SdNotifier {
  /** True when NOTIFY_SOCKET was set (the service manager listens). */
  readonly enabled: boolean;
  /** The watchdog interval systemd asked for (WATCHDOG_USEC), in ms; 0 when off. */
  readonly watchdogMs: number;
  /** READY=1 with an optional STATUS= line (and MAINPID=, so a fork-free start is attributed to us). */
  ready(status?: string): void;
  /** STATUS=<one line>: what `systemctl status` shows. */
  status(text: string): void;
  /** RELOADING=1 (SIGHUP reload begins); `ready()` ends it. */
  reloading(status?: string): void;
  /** STOPPING=1 with an optional STATUS= line; stops the watchdog pings. */
  stopping(status?: string): void;
  /** Any raw assignments (tests, EXTEND_TIMEOUT_USEC=...). */
  send(fields: Record<string, string | number>): void;
  /** Stop the watchdog timer (idempotent). */
  close(): void;
}

/** One line of STATUS=: newlines would start a new assignment, so they become spaces; capped at 512 bytes. */
function oneLine(s: string): string {
  return s.replace(/[\r\n]+/g, ' ').slice(0, 512);
}

/** The datagram for `fields`, in the order given. */
export function sdNotifyMessage(fields: Record<string, string | number>): string {
  return Object.entries(fields)
    .map(([k, v]) => `${k}=${typeof v === 'number' ? String(v) : oneLine(v)}`)
    .join('\n');
}

/**
 * The notifier for this process, from $NOTIFY_SOCKET and $WATCHDOG_USEC / $WATCHDOG_PID in `env`.
 * Starts the watchdog pings (every half interval, on an unref'd timer) when systemd asked for them.
 * @example const sd = sdNotifier(); ...listen...; sd.ready('serving 3 volumes'); ...; sd.stopping();
 */
export function sdNotifier(env: NodeJS.ProcessEnv = process.env, component = 'cryptmap'): SdNotifier {
  const address = env.NOTIFY_SOCKET ?? '';
  const enabled = address.startsWith('/') || (address.startsWith('@') && address.length > 1);
  if (address !== '' && !enabled)
    log.warn('NOTIFY_SOCKET ignored: neither a path nor an @abstract name', { NOTIFY_SOCKET: address });
  const usec = Number(env.WATCHDOG_USEC ?? '');
  const forUs = env.WATCHDOG_PID === undefined || Number(env.WATCHDOG_PID) === process.pid;
  const watchdogMs =
    enabled && Number.isSafeInteger(usec) && usec > 0 && forUs ? Math.max(1, Math.floor(usec / 1000)) : 0;
  let warned = false;
  let stopped = false;
  const addon = enabled ? loadNative() : null;
  const transmit = (msg: string) => {
    if (!enabled) return;
    const fail = (e: unknown) => {
      if (warned) return;
      warned = true;
      log.warn('cannot notify the service manager', {
        component,
        NOTIFY_SOCKET: address,
        error: e instanceof Error ? e.message : String(e),
      });
    };
    if (addon && typeof addon.sdNotify === 'function') {
      try {
        addon.sdNotify(address, msg);
      } catch (e) {
        fail(e);
      }
      return;
    }
    // No addon: systemd's own client, which sends from its pid (hence NotifyAccess=all in that case).
    execFile(
      'systemd-notify',
      ['--no-block', `--pid=${process.pid}`, ...msg.split('\n')],
      { env: { ...process.env, NOTIFY_SOCKET: address }, timeout: 10_000 },
      (e) => {
        if (e) fail(e);
      },
    );
  };
  if (enabled && !(addon && typeof addon.sdNotify === 'function')) {
    log.warn('sd_notify through systemd-notify (native addon not loaded): the unit needs NotifyAccess=all', {
      component,
    });
  }
  let timer: NodeJS.Timeout | undefined;
  if (watchdogMs > 0) {
    timer = setInterval(() => transmit('WATCHDOG=1'), Math.max(1, Math.floor(watchdogMs / 2)));
    timer.unref();
  }
  const close = () => {
    if (timer) clearInterval(timer);
    timer = undefined;
  };
  const send = (fields: Record<string, string | number>) => transmit(sdNotifyMessage(fields));
  return {
    enabled,
    watchdogMs,
    ready: (status) => {
      if (stopped) return;
      send({ READY: 1, ...(status !== undefined ? { STATUS: status } : {}), MAINPID: process.pid });
    },
    status: (text) => send({ STATUS: text }),
    reloading: (status) => send({ RELOADING: 1, ...(status !== undefined ? { STATUS: status } : {}) }),
    stopping: (status) => {
      stopped = true;
      close();
      send({ STOPPING: 1, ...(status !== undefined ? { STATUS: status } : {}) });
    },
    send,
    close,
  };
}

/** A descriptor systemd passed for socket activation, with its FileDescriptorName= (or 'unknown'). */
export interface ListenFd {
  readonly fd: number;
  readonly name: string;
}

let taken: ListenFd[] | undefined;

/**
 * The sockets systemd passed (sd_listen_fds(3)): fds 3.. when LISTEN_PID is our pid. Read once; the
 * LISTEN_* variables are then removed from `env` so child processes do not take them as theirs.
 * @example const control = listenFds().find((f) => f.name === 'control');
 */
export function listenFds(env: NodeJS.ProcessEnv = process.env): readonly ListenFd[] {
  if (taken !== undefined) return taken;
  taken = [];
  const pid = Number(env.LISTEN_PID ?? '');
  const n = Number(env.LISTEN_FDS ?? '');
  if (pid === process.pid && Number.isSafeInteger(n) && n > 0 && n < 1024) {
    const names = (env.LISTEN_FDNAMES ?? '').split(':');
    for (let i = 0; i < n; i++) taken.push({ fd: 3 + i, name: names[i] || 'unknown' });
  }
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  return taken;
}
