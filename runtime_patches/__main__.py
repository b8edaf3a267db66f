"""``python -m runtime_patches``: install and inspect BanaServe's patches to SGLang.

Commands:
  install-pth   write banaserve_runtime_patches.pth into this interpreter's site-packages, so the
                import hook loads in every Python process of the venv (SGLang's children too)
  doctor        check that the hook loads, the pinned versions are installed, and (unless --fast)
                that every CPU patch applies to the installed SGLang in a fresh CPU-engine process
  list          print the patch table: name, kind, target, version, rationale
  layer-host    run a layer host: a process that holds and runs decoder layers migrated from
                workers (POST /banaserve/migrate_layers on a worker started with
                --layer-host NAME=HOST:PORT); see docs/layer_migration.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig

from runtime_patches import SGLANG_VERSION, boot
from runtime_patches.registry import REGISTRY, PatchError, installed_version

PTH_NAME = "banaserve_runtime_patches.pth"
PTH_LINE = (
    "import importlib.util as _bs_u; _bs_u.find_spec('runtime_patches') and "
    "__import__('runtime_patches.boot').boot.install()\n"
)

_PROBE = """
import importlib, json, sys
from runtime_patches.registry import REGISTRY
from runtime_patches import plugin
for name in sorted(REGISTRY.target_modules()):
    importlib.import_module(name)
import sgl_kernel
print(json.dumps({"applied": plugin.verify_process(), "sgl_kernel": sgl_kernel.__version__}))
"""


def pth_path() -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)


def cmd_install_pth(args: argparse.Namespace) -> int:
    path = pth_path()
    with open(path, "w") as f:
        f.write(PTH_LINE)
    print(f"wrote {path}")
    return 0


def _probe_cpu_patches() -> dict[str, object]:
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise PatchError(lines[-1] if lines else f"probe exited with {proc.returncode}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def cmd_doctor(args: argparse.Namespace) -> int:
    say = (lambda *a: None) if args.quiet else print
    found = installed_version("sglang")
    if found != SGLANG_VERSION:
        print(f"runtime_patches: sglang=={SGLANG_VERSION} required, found {found}",
              file=sys.stderr)
        return 1
    if not os.path.exists(pth_path()) or not boot.is_installed():
        print(f"runtime_patches: import hook not active ({pth_path()} missing); "
              "run `python -m runtime_patches install-pth`", file=sys.stderr)
        return 1
    try:
        REGISTRY.check_versions()
        say(f"sglang {found}: ok; import hook: active")
        if args.fast or not (installed_version("torch") or "").endswith("+cpu"):
            return 0
        probe = _probe_cpu_patches()
    except PatchError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    applied = probe["applied"]
    assert isinstance(applied, list)
    say(f"CPU engine: sgl_kernel stand-in {probe['sgl_kernel']}; "
        f"{len(applied)} patches applied: {', '.join(applied)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for p in REGISTRY.patches():
        print(f"{p.name:36} {p.kind:8} {p.package}=={p.version:8} {p.target}\n"
              f"{'':36} {p.rationale}")
    return 0


def cmd_layer_host(args: argparse.Namespace) -> int:
    import logging
    import signal

    from runtime_patches.migration.host import serve
    from runtime_patches.migration.host_runtime import HostRefusal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s layer-host %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        serve(args.host, args.port, args.threads, args.warm_model, args.warm_dtype)
    except HostRefusal as exc:
        print(f"layer-host: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"layer-host: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime_patches", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install-pth", help="activate the import hook in this venv")
    doctor = sub.add_parser("doctor", help="verify versions, hook and patches")
    doctor.add_argument("--fast", action="store_true", help="skip the CPU-engine probe process")
    doctor.add_argument("--quiet", action="store_true", help="print only errors")
    sub.add_parser("list", help="print the patch table")
    host = sub.add_parser("layer-host", help="hold and run decoder layers migrated from workers")
    host.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    host.add_argument("--port", type=int, required=True, help="TCP port")
    host.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    host.add_argument("--warm-model", metavar="DIR",
                      help="initialise SGLang's runtime from this model folder at start, so the "
                           "first migration here does not pause the worker for it")
    host.add_argument("--warm-dtype", choices=["bfloat16", "float32", "float16"],
                      help="dtype to warm up in, the workers' served dtype (default: the "
                           "launcher's choice on this machine)")
    args = parser.parse_args(argv)
    boot.install()
    handler = {"install-pth": cmd_install_pth, "doctor": cmd_doctor, "list": cmd_list,
               "layer-host": cmd_layer_host}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
