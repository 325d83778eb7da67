"""Stand-in ``scontrol`` and ``srun`` that run a SLURM batch script's nodes on this machine.

``install(dir)`` writes both into ``dir`` (put it first on PATH) and returns it. They read:

- ``STANDIN_HOSTS``: the job's host names, space-separated (``scontrol show hostnames`` prints them);
- ``STANDIN_NODE_LOGS``: a directory for ``node<i>.log``, each node's stdout and stderr, and
  ``node<i>.pgid``, the process group of the node's launcher and ranks.

``srun [options] command...`` starts ``command`` once per host, at the same time, as srun starts one
task per node: ``SLURM_NODEID``/``SLURM_PROCID`` = i, ``SLURM_LOCALID`` = 0, and a TMPDIR of the
node's own (a real node's TMPDIR is local to it). It waits for all and exits with the first non-zero
status (a failing node stops the others, as ``--kill-on-bad-exit``). Before starting anything it
refuses (exit 3, naming the offender) a command line or environment that names a path under the batch step's TMPDIR: that path exists on the first node only.
"""

import os
import stat
import sys

SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames NODELIST: the stand-in job's hosts, one a line.
[[ "$1 $2" == "show hostnames" ]] || { echo "stand-in scontrol: only 'show hostnames' ($*)" >&2; exit 2; }
tr ' ' '\\n' <<< "$STANDIN_HOSTS"
"""

SRUN = '''#!{python}
import os, signal, subprocess, sys, tempfile, time

args = sys.argv[1:]
while args and args[0].startswith("-"):  # srun's own options (--ntasks-per-node=1, ...)
    args.pop(0)
batch_tmp = os.environ.get("TMPDIR") or tempfile.gettempdir()
names = {{batch_tmp.rstrip("/"), os.path.realpath(batch_tmp)}}
# TMPDIR itself is replaced per node below; anything else naming a path under it would not exist there.
offenders = [f"argument {{arg!r}}" for arg in args if any(name in arg for name in names)]
offenders += [f"environment {{key}}={{value}}" for key, value in os.environ.items()
              if key != "TMPDIR" and any(name in value for name in names)]
if offenders:
    print(f"stand-in srun: the batch step's TMPDIR {{batch_tmp}} is on the first node only, but a node is "
          f"handed: {{'; '.join(offenders)}}", file=sys.stderr)
    sys.exit(3)
hosts = os.environ["STANDIN_HOSTS"].split()
logs = os.environ["STANDIN_NODE_LOGS"]
os.makedirs(logs, exist_ok=True)
nodes = []
for rank in range(len(hosts)):
    node_tmp = tempfile.mkdtemp(prefix=f"node{{rank}}-tmp-", dir=logs)
    env = {{**os.environ, "SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
           "SLURMD_NODENAME": hosts[rank], "TMPDIR": node_tmp}}
    log = open(os.path.join(logs, f"node{{rank}}.log"), "w")
    nodes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    with open(os.path.join(logs, f"node{{rank}}.pgid"), "w") as out:  # for a caller that must stop the node
        out.write(str(nodes[-1].pid))
# --kill-on-bad-exit: the first node that fails stops the others (they would wait in the rendezvous).
while any(node.poll() is None for node in nodes):
    if any(node.returncode for node in nodes):
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the launcher and its ranks
        break
    time.sleep(0.2)
codes = [node.wait() for node in nodes]
sys.exit(next((code for code in codes if code), 0))
'''


def install(directory) -> str:
    """Write ``scontrol`` and ``srun`` into ``directory`` (created) and return its path."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN.format(python=sys.executable))):
        path = os.path.join(directory, name)
        with open(path, "w") as out:
            out.write(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory
