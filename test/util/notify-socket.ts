/**
 * A fake service manager's notify socket for tests (sd_notify(3)): a Unix datagram socket bound by a
 * python3 child (Node has no Unix datagram sockets), which prints each datagram as one JSON line.
 * `next(pred)` waits for a matching datagram with a deadline and fails with what did arrive.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { requireTool } from '../helpers/tools.js';

const RECEIVER = `
import json, os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path if not path.startswith('@') else '\\0' + path[1:])
print(json.dumps('LISTENING'), flush=True)
while True:
    data = s.recv(65536)
    print(json.dumps(data.decode('utf-8', 'replace')), flush=True)
`;

export interface NotifySocket {
  /** The NOTIFY_SOCKET value ('/path' or '@name'). */
  readonly address: string;
  /** Every datagram received so far, in order. */
  readonly messages: string[];
  /** The first datagram (from index `from` on) that `pred` accepts; rejects after `ms`. */
  next(pred: (m: string) => boolean, ms?: number, from?: number): Promise<string>;
  close(): void;
}

/** Bind a receiver at `address`; resolves once it is bound (rejects after 30 s; throws when python3 is not installed). */
export function notifySocket(address: string): Promise<NotifySocket> {
  requireTool('python3');
  const child: ChildProcess = spawn('python3', ['-c', RECEIVER, address], { stdio: ['ignore', 'pipe', 'pipe'] });
  const messages: string[] = [];
  const waiters = new Set<() => void>();
  let err = '';
  let buf = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  return new Promise((resolve, reject) => {
    const deadline = setTimeout(() => {
      child.kill();
      reject(new Error(`notify receiver did not bind ${address} in 30 s: ${err}`));
    }, 30_000);
    child.once('error', (e) => {
      clearTimeout(deadline);
      reject(
        new Error(
          `python3 is needed for the notify receiver (Debian package python3; scripts/install-deps.sh): ${e.message}`,
        ),
      );
    });
    child.once('exit', (code) => {
      clearTimeout(deadline);
      reject(new Error(`notify receiver exited (${code}): ${err}`));
    });
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      let nl = buf.indexOf('\n');
      while (nl >= 0) {
        const m = JSON.parse(buf.slice(0, nl)) as string;
        buf = buf.slice(nl + 1);
        nl = buf.indexOf('\n');
        if (m === 'LISTENING' && messages.length === 0) {
          clearTimeout(deadline);
          resolve(api);
          continue;
        }
        messages.push(m);
        for (const w of [...waiters]) w();
      }
    });
    const api: NotifySocket = {
      address,
      messages,
      next(pred, ms = 60_000, from = 0) {
        return new Promise((res, rej) => {
          const check = () => {
            const hit = messages.slice(from).find(pred);
            if (hit === undefined) return;
            waiters.delete(check);
            clearTimeout(t);
            res(hit);
          };
          const t = setTimeout(() => {
            waiters.delete(check);
            rej(new Error(`no matching notify datagram in ${ms} ms; got: ${JSON.stringify(messages)}`));
          }, ms);
          waiters.add(check);
          check();
        });
      },
      close() {
        child.removeAllListeners('exit');
        child.kill();
      },
    };
  });
}
