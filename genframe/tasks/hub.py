"""``genframe hub <verb> key=value ...``: the local model hub (see `genframe.hub`)."""

from __future__ import annotations

import json
import sys
from typing import Any

from genframe import hub
from genframe.errors import UserError, did_you_mean
from genframe.tasks.common import parse_key_values

#: verb -> (required keys, optional keys, one line of help)
VERBS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "push": (("run", "name"), ("license", "intended_use", "limitations"),
             "store a completed run as the next version of NAME"),
    "list": ((), (), "every stored name:version (STATUS: files present at their sizes)"),
    "show": (("name",), (), "the model card and files of NAME[:VERSION] (checked)"),
    "pull": (("name", "out"), (), "copy NAME[:VERSION] (checked) into the new folder OUT"),
    "rm": (("name",), (), "remove NAME:VERSION, NAME:latest or NAME:all"),
    "verify": ((), ("name",), "check every file of NAME[:VERSION] (all entries without name=) "
                              "against its checksums"),
}

HELP = f"""usage: genframe hub <verb> [key=value ...] [--json]

The local model hub in {hub.HUB_ENV} (default: the genframe cache folder's hub/).

  push run=DIR name=NAME [license=...] [intended_use=...] [limitations=...]
  list
  show name=NAME[:VERSION]
  pull name=NAME[:VERSION] out=DIR
  rm   name=NAME:VERSION | NAME:latest | NAME:all
  verify [name=NAME[:VERSION]]   (every entry without name=)

NAME: lower-case letters, digits, '.', '_', '-'. A version is an integer; 'latest' (or no
version) is the highest. Versions never change and are never reused. Tasks that take
run= also take hub=NAME[:VERSION] (e.g. genframe generate hub=digits-vae:1).
"""


def _parse(verb: str, args: list[str]) -> tuple[dict[str, str], bool]:
    required, optional, _ = VERBS[verb]
    opts, as_json = parse_key_values(args, (*required, *optional), f"hub {verb}")
    missing = [k for k in required if not opts.get(k)]
    if missing:
        raise UserError(f"hub {verb}: give {' and '.join(f'{k}=...' for k in missing)}; "
                        "see `genframe hub --help`")
    return opts, as_json


def _row(entry: hub.Entry) -> dict[str, Any]:
    """One line of `hub list`. STATUS compares the files with the manifest by presence and
    size only (`hub verify` reads every byte against the checksums): ``complete`` or
    ``damaged`` (a missing, added or cut file)."""
    try:
        hub.verify(entry, checksums=False)
        status = "complete"
    except UserError:
        status = "damaged"
    card = entry.card()
    size = sum(p.stat().st_size for p in entry.path.rglob("*") if p.is_file())
    return {"name": entry.name, "version": entry.version, "ref": entry.ref,
            "model": (card.get("model") or {}).get("name"),
            "data": (card.get("data") or {}).get("name"),
            "created": card.get("created"), "bytes": size, "status": status,
            "path": str(entry.path)}


def main(args: list[str]) -> int:
    """The CLI entry: ``genframe hub <verb> key=value ...``; returns the exit status."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        raise UserError(f"hub: unknown verb {verb!r}.{did_you_mean(verb, VERBS)} "
                        f"Verbs: {', '.join(VERBS)} (see `genframe hub --help`)")
    if any(a in ("-h", "--help") for a in rest):
        print(HELP)
        return 0
    opts, as_json = _parse(verb, rest)
    if verb == "push":
        entry = hub.push(opts["run"], opts["name"], license=opts.get("license"),
                         intended_use=opts.get("intended_use"),
                         limitations=opts.get("limitations"))
        _out({"ref": entry.ref, "path": str(entry.path)} if as_json else
             f"pushed {entry.ref} ({entry.path})\nuse it: genframe generate hub={entry.ref}",
             as_json)
    elif verb == "list":
        rows = [_row(e) for e in hub.list_entries()]
        if as_json:
            _out(rows, True)
        elif not rows:
            print(f"the hub {hub.hub_dir()} is empty (genframe hub push run=DIR name=NAME)")
        else:
            head = ("NAME:VERSION", "MODEL", "DATA", "CREATED", "MB", "STATUS")
            table = [head, *[(r["ref"], str(r["model"]), str(r["data"]), str(r["created"]),
                              f"{r['bytes'] / 1e6:.2f}", r["status"]) for r in rows]]
            widths = [max(len(r[i]) for r in table) for i in range(len(head))]
            for r in table:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    elif verb == "verify" and not opts.get("name"):
        problems = _verify_all(as_json)
        if problems:
            raise UserError(f"{problems} hub {'entry is' if problems == 1 else 'entries are'} damaged "
                            "(listed above)")
    elif verb in ("show", "verify"):
        entry = hub.verified(opts["name"], key="name")
        card = entry.card()
        manifest = json.loads((entry.path / hub.MANIFEST).read_text())["files"]
        if as_json:
            _out({"ref": entry.ref, "path": str(entry.path), "card": card, "files": manifest}
                 if verb == "show" else {"ref": entry.ref, "ok": True}, True)
        elif verb == "verify":
            print(f"{entry.ref}: all {len(manifest)} files match their checksums")
        else:
            print((entry.path / hub.CARD).read_text(encoding="utf-8").rstrip())
            print(f"\n## Files ({entry.path}; checksums verified)\n")
            for rel, rec in sorted(manifest.items()):
                print(f"  {rel:<24} {rec['size']:>12,} B  sha256 {rec['sha256'][:16]}")
    elif verb == "pull":
        out = hub.pull(opts["name"], opts["out"])
        _out({"path": str(out)} if as_json else f"pulled {opts['name']} into {out}", as_json)
    elif verb == "rm":
        removed = hub.remove(opts["name"])
        _out([e.ref for e in removed] if as_json else
             "removed " + ", ".join(e.ref for e in removed), as_json)
    sys.stdout.flush()
    return 0


def _verify_all(as_json: bool) -> int:
    """Check every entry against its checksums, one line each; returns how many fail."""
    results = []
    for entry in hub.list_entries():
        try:
            hub.verify(entry)
            results.append({"ref": entry.ref, "ok": True})
        except UserError as exc:
            results.append({"ref": entry.ref, "ok": False, "problem": str(exc)})
    if as_json:
        _out(results, True)
    else:
        for r in results:
            print(f"{r['ref']}: " + ("all files match their checksums" if r["ok"] else r["problem"]))
        if not results:
            print(f"the hub {hub.hub_dir()} is empty")
    return sum(not r["ok"] for r in results)


def _out(value: Any, as_json: bool) -> None:
    print(json.dumps(value, indent=2, default=str) if as_json else value)
