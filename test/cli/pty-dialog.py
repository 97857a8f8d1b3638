#!/usr/bin/env python3
"""Run a command on a pseudo-terminal and answer its prompts (a small `expect` for the CLI tests).

    pty-dialog.py STEPS_JSON DEADLINE_S CMD [ARG...]

STEPS_JSON is a list of [text to wait for, line to send or null, raw]: with raw true the text is sent
as it is, without the newline (\u0004 is Ctrl-D). Every wait has the deadline; a text
that does not come in time ends the run with exit 124 and "TIMEOUT waiting for ...". Prints the whole
terminal transcript, then "EXIT <code>" of the command.
"""
import json, os, pty, select, signal, sys, time

steps = json.loads(sys.argv[1])
deadline_s = float(sys.argv[2])
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[3], sys.argv[3:])
buf = b''
def read_until(pred):
    global buf
    end = time.monotonic() + deadline_s
    while not pred():
        left = end - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                d = os.read(fd, 4096)
            except OSError:
                d = b''
            if not d:
                return pred()
            buf += d
    return True
pos = 0
for step in steps:
    want, send = step[0], step[1]
    raw = len(step) > 2 and step[2]
    w = want.encode()
    if not read_until(lambda: buf.find(w, pos) >= 0):
        sys.stdout.write(buf.decode(errors='replace') + '\nTIMEOUT waiting for %r\n' % want)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        sys.exit(124)
    pos = buf.find(w, pos) + len(w)
    if send is not None:
        time.sleep(0.05)
        os.write(fd, send.encode() + (b'' if raw else b'\n'))
end = time.monotonic() + deadline_s
while time.monotonic() < end:
    r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
    if not r:
        continue
    try:
        d = os.read(fd, 4096)
    except OSError:
        d = b''
    if not d:
        break
    buf += d
else:
    sys.stdout.write(buf.decode(errors='replace') + '\nTIMEOUT waiting for the end\n')
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    sys.exit(124)
_, status = os.waitpid(pid, 0)
sys.stdout.write(buf.decode(errors='replace') + '\nEXIT %d\n' % os.waitstatus_to_exitcode(status))
