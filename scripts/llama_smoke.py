"""Exit 0 when llama.cpp generates from a multi-token prompt with the packaged student, else crash or 1.

install.sh runs it after the build: a llama.cpp compiled with instructions the machine cannot run (AMX on a VM
that does not grant it) loads fine and segfaults on the first batched matmul."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import llama_cpp
        from models.student_base import student_gguf_path
        from streams.settings import Settings
    except ImportError as exc:  # the data wheel comes after the build; nothing to test yet
        print(f"llama_smoke: skipped ({exc})", file=sys.stderr)
        return 0
    path = student_gguf_path(Settings.from_env())
    if not path.is_file():
        print(f"llama_smoke: skipped (no {path})", file=sys.stderr)
        return 0
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    out = llm("one two three four", max_tokens=2)["choices"][0]["text"]
    return 0 if isinstance(out, str) else 1


if __name__ == "__main__":
    raise SystemExit(main())
