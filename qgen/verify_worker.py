"""The answer-check worker: a separate process (run by path, importing nothing of qgen) that compares answer
pairs with math-verify in its main thread, where math-verify's ``signal.alarm`` timeouts work.

Protocol: one JSON line per request on stdin, ``{"pairs": [[gold, target], ...], "timeout": seconds}``; one
JSON line per reply on stdout, ``[true | false | null, ...]`` (``null``: math-verify reads one side as no
maths). The parent (:class:`qgen.answers.Verifier`) kills and restarts this process past a hard deadline.
"""

import json
import sys


def main() -> None:
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    try:
        import resource

        cap = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, ValueError, OSError):
        pass
    from math_verify import parse, verify

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing printed by a library may corrupt the protocol
    for line in sys.stdin:
        request = json.loads(line)
        timeout = int(request.get("timeout", 3))
        results = []
        for gold, target in request["pairs"]:
            try:
                g = parse(f"${gold}$", parsing_timeout=timeout)
                t = parse(f"${target}$", parsing_timeout=timeout)
                results.append(bool(verify(g, t, timeout_seconds=timeout)) if g and t else None)
            except BaseException:  # noqa: BLE001 - a comparison that fails is "not shown equal"
                results.append(False)
        out.write(json.dumps(results) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
