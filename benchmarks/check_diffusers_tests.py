"""diffusers' own fast tests, untraced and traced: does tracing change anything diffusers tests?

    python benchmarks/check_diffusers_tests.py                 # every family (CPU: long)
    python benchmarks/check_diffusers_tests.py --only sana pixart-alpha
    python benchmarks/check_diffusers_tests.py --render        # the markdown again from the json
    python benchmarks/check_diffusers_tests.py --only flux2 qwen-image z-image chroma \
        flux-kontext --out benchmarks/results/diffusers_tests-2026.json   # the 2026 families

For every pipeline class sdlens supports (SD 1.x / 2.x / XL, SD3 / SD3.5, Flux.1, PixArt-alpha /
Sigma, Sana, ControlNet; and the 2026 families: Flux.2 dev / klein / klein inpaint, Qwen-Image /
img2img / inpaint / Edit / Edit-Plus, Z-Image, Chroma / img2img, Flux.1 Kontext; every class
sdlens traces that has a test file of its own) it runs diffusers' test files for that class
twice in fresh pytest
processes: once as they are, once with every call of a supported pipeline made inside
``sdlens.trace(pipe)`` (this file is the pytest plugin that does it: ``-p check_diffusers_tests``).
It lists

* every test whose outcome differs between the two runs,
* every exception raised from sdlens's code (the innermost frame of sdlens, diffusers,
  transformers or the tests that the exception passed through is in ``sdlens/``),
* every pipeline left changed after a traced call (class, scheduler class and ``step``, attention
  processors, module hooks, an instance-level ``forward``, any sdlens object left in a
  component's attributes),

and writes them to ``benchmarks/results/diffusers_tests.json`` and ``diffusers_tests.md`` (or
``--out``'s json and the markdown beside it: ``diffusers_tests-2026.json`` for the 2026
families; the markdown names its json).

The test files are diffusers' at ``DIFFUSERS_COMMIT`` (the mirror's newest commit; the installed
diffusers is newer, see the json), unpacked under ``benchmarks/_work/diffusers-tests`` (ignored by
git). The hub is unreachable, so the tiny models those tests load by name are built here as
stand-ins in a local hub cache (``benchmarks/_work/hub``, ``HF_HUB_OFFLINE=1``):

* ``hf-internal-testing/tiny-random-clip``: a 1000-token CLIP BPE tokenizer (the first 486 merges
  of the CLIP vocabulary shipped with sdlens; the tests' CLIP text encoders have 1000 tokens),
* ``hf-internal-testing/tiny-random-t5``: a tiny T5 config and sdlens's local SentencePiece T5
  tokenizer (``sdlens.testing.t5_tokenizer``),
* ``hf-internal-testing/dummy-gemma``: a Gemma tokenizer of 8 pieces (the Sana tests' Gemma-2 has
  ``vocab_size=8``; every word is ``<unk>``),
* ``hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration`` (the Qwen-Image, Z-Image and
  Flux.2 klein tests' ``Qwen2Tokenizer`` / ``Qwen2TokenizerFast``): ``sdlens.testing.qwen_tokenizer``,
  a byte-level BPE of a few hundred pieces trained here with Qwen2's pre-tokenizer split, its
  special tokens (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ... at small ids, not
  the real 151643+) and Qwen3's chat template; and Qwen2-VL's image processor (PIL backend). No
  video processor: transformers' video processors need torchvision, which is not installed
  (the one wheel here does not load against the CPU torch), so ``Qwen2VLProcessor.from_pretrained``
  fails, and with it every Qwen-Image-Edit / Edit-Plus test that builds the pipeline, the same
  way in both runs (sdlens's own Edit beds, ``tests/engine/test_qwenimage_edit.py``, build the
  processor without a video processor),
* ``hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor`` (the Flux.2 dev
  tests' ``AutoProcessor``): ``sdlens.testing.mistral_tokenizer`` alone (a byte-level BPE trained
  here with Tekken's split, its control tokens at their real ids, the system / user chat
  template) and a tiny ``MistralConfig`` so that ``AutoProcessor`` falls back to the tokenizer;
  not the real ``PixtralProcessor`` (its image processor needs torchvision). Flux2Pipeline's
  text path only calls ``apply_chat_template``, which the tokenizer answers as the processor
  does for text.

Tests that need what is not here (other hub files, images by URL, a GPU) fail or skip the same
way in both runs and are counted as such.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work"
TESTS = WORK / "diffusers-tests"
HUB = WORK / "hub"
RESULTS = REPO / "benchmarks" / "results"
MIRROR = Path("/work/.mirror/huggingface+diffusers/repo")
DIFFUSERS_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"  # main, 2026-08-23

# family -> diffusers test files (tests/pipelines/...) of the pipeline classes sdlens supports
FAMILIES = {
    "pixart-alpha": ["pixart_alpha/test_pixart.py"],
    "pixart-sigma": ["pixart_sigma/test_pixart.py"],
    "sana": ["sana/test_sana.py"],
    "sd3": ["stable_diffusion_3/test_pipeline_stable_diffusion_3.py",
            "stable_diffusion_3/test_pipeline_stable_diffusion_3_img2img.py",
            "stable_diffusion_3/test_pipeline_stable_diffusion_3_inpaint.py"],
    "flux": ["flux/test_pipeline_flux.py", "flux/test_pipeline_flux_img2img.py",
             "flux/test_pipeline_flux_inpaint.py"],
    "sd1": ["stable_diffusion/test_stable_diffusion.py",
            "stable_diffusion/test_stable_diffusion_img2img.py",
            "stable_diffusion/test_stable_diffusion_inpaint.py"],
    "sdxl": ["stable_diffusion_xl/test_stable_diffusion_xl.py",
             "stable_diffusion_xl/test_stable_diffusion_xl_img2img.py",
             "stable_diffusion_xl/test_stable_diffusion_xl_inpaint.py"],
    "controlnet": ["controlnet/test_controlnet.py", "controlnet/test_controlnet_img2img.py",
                   "controlnet/test_controlnet_inpaint.py", "controlnet/test_controlnet_sdxl.py",
                   "controlnet/test_controlnet_sdxl_img2img.py",
                   "controlnet/test_controlnet_inpaint_sdxl.py"],
    "sd2": ["stable_diffusion_2/test_stable_diffusion.py",
            "stable_diffusion_2/test_stable_diffusion_inpaint.py",
            "stable_diffusion_2/test_stable_diffusion_v_pred.py"],
    # the 2026 families (their results: --out benchmarks/results/diffusers_tests-2026.json);
    # only the files of the classes sdlens traces (not Flux2KleinKVPipeline,
    # ZImageImg2Img / Inpaint, ChromaInpaint (no test file), FluxKontextInpaint, QwenImageControlNet)
    "flux2": ["flux2/test_pipeline_flux2.py", "flux2/test_pipeline_flux2_klein.py",
              "flux2/test_pipeline_flux2_klein_inpaint.py"],
    "qwen-image": ["qwenimage/test_qwenimage.py", "qwenimage/test_qwenimage_img2img.py",
                   "qwenimage/test_qwenimage_inpaint.py", "qwenimage/test_qwenimage_edit.py",
                   "qwenimage/test_qwenimage_edit_plus.py"],
    "z-image": ["z_image/test_z_image.py"],
    "chroma": ["chroma/test_pipeline_chroma.py", "chroma/test_pipeline_chroma_img2img.py"],
    "flux-kontext": ["flux/test_pipeline_flux_kontext.py"],
}
MODES = ("untraced", "traced")
# the fast tests: every class but the integration / slow / nightly ones (those need the hub's
# real checkpoints and a GPU; most are skipped by their decorators anyway)
SELECT = "not Integration and not Slow and not Nightly"
SITE = WORK / "site"  # the tests' own pure-python requirements, outside the venv
TEST_DEPS = ("parameterized", "requests_mock")


# ============================================================== setup: tests and hub stand-ins
def unpack_tests() -> None:
    """diffusers' tests/ at DIFFUSERS_COMMIT under benchmarks/_work/diffusers-tests."""
    if (TESTS / "COMMIT").exists() and (TESTS / "COMMIT").read_text().strip() == DIFFUSERS_COMMIT:
        (TESTS / "pytest.ini").write_text("[pytest]\n")
        return
    if not MIRROR.exists():
        sys.exit(f"no diffusers mirror at {MIRROR}: fetch github:huggingface/diffusers first")
    TESTS.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "--format=tar",
                              DIFFUSERS_COMMIT, "tests"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(TESTS)], input=archive, check=True)
    (TESTS / "pytest.ini").write_text("[pytest]\n")  # rootdir here, not sdlens's pyproject
    (TESTS / "COMMIT").write_text(DIFFUSERS_COMMIT + "\n")


def install_test_deps() -> None:
    """diffusers' test helpers import these; pip-installed (no dependencies) into
    benchmarks/_work/site rather than the venv."""
    import importlib.util

    sys.path.insert(0, str(SITE))
    missing = [m for m in TEST_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(SITE), *missing], check=True)


def _snapshot(repo_id: str) -> Path:
    """An offline hub-cache snapshot folder for ``repo_id`` (refs/main -> a fixed revision)."""
    rev = "0" * 40
    root = HUB / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def build_hub() -> dict[str, str]:
    """The stand-ins, written once; returns what each one is."""
    sys.path.insert(0, str(REPO))
    import transformers

    from sdlens.testing import TOKENIZER_DIR, t5_tokenizer

    made = {}
    # CLIP: the shipped CLIP BPE cut to 1000 tokens (bytes, 486 merges, the two specials)
    snap = _snapshot("hf-internal-testing/tiny-random-clip")
    if not (snap / "tokenizer.json").exists():
        tok = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
        model = tok["model"]
        n_merges = 1000 - 2 - 512
        model["vocab"] = {k: v for k, v in model["vocab"].items() if v < 512 + n_merges}
        model["merges"] = model["merges"][:n_merges]
        special = {"<|startoftext|>": 998, "<|endoftext|>": 999}
        model["vocab"].update(special)
        for t in tok["added_tokens"]:
            t["id"] = special[t["content"]]
        pp = tok["post_processor"]
        pp["sep"][1], pp["cls"][1] = special[pp["sep"][0]], special[pp["cls"][0]]
        (snap / "tokenizer.json").write_text(json.dumps(tok))
        (snap / "tokenizer_config.json").write_text((TOKENIZER_DIR / "tokenizer_config.json")
                                                    .read_text())
    made["hf-internal-testing/tiny-random-clip"] = (
        "CLIP BPE tokenizer, 1000 tokens (bytes + the first 486 merges of sdlens's CLIP vocab)")
    # T5: a tiny config (its vocabulary holds the local tokenizer's) and the local tokenizer
    snap = _snapshot("hf-internal-testing/tiny-random-t5")
    if not (snap / "config.json").exists():
        tok = t5_tokenizer(max_length=512)
        tok.save_pretrained(snap)
        transformers.T5Config(vocab_size=1103, d_model=32, d_ff=37, d_kv=8, num_heads=4,
                              num_layers=5, num_decoder_layers=5, relative_attention_num_buckets=8,
                              dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
                              decoder_start_token_id=0).save_pretrained(snap)
    made["hf-internal-testing/tiny-random-t5"] = (
        "T5Config (vocab 1103, d_model 32, 5 layers) + sdlens.testing.t5_tokenizer "
        "(local SentencePiece, ~400 pieces)")
    # Gemma: 8 pieces (the tests' Gemma-2 has vocab_size=8): every word is <unk>
    snap = _snapshot("hf-internal-testing/dummy-gemma")
    if not (snap / "tokenizer_config.json").exists():
        from transformers import GemmaTokenizer

        vocab = {p: i for i, p in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "e",
                                              "o"])}
        tok = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, model_max_length=300)
        tok.save_pretrained(snap)
    made["hf-internal-testing/dummy-gemma"] = "Gemma BPE tokenizer of 8 pieces (no merges)"
    # Qwen2-VL (Qwen-Image, Qwen-Image-Edit, Z-Image, Flux.2 klein): sdlens's local Qwen2-style
    # byte-level BPE, and Qwen2.5-VL's image processor (PIL backend) for the Edit processors
    snap = _snapshot("hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration")
    if not (snap / "tokenizer_config.json").exists():
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil)

        from sdlens.testing import qwen_tokenizer

        qwen_tokenizer().save_pretrained(snap)
        Qwen2VLImageProcessorPil().save_pretrained(snap)
    made["hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration"] = (
        "sdlens.testing.qwen_tokenizer (a Qwen2Tokenizer: byte-level BPE of ~700 pieces trained "
        "here with Qwen2's pre-tokenizer split, special tokens and Qwen3's chat template) + "
        "Qwen2-VL's image processor (PIL); no video processor (it needs torchvision, not "
        "installed)")
    # Mistral-Small-3.1's processor (Flux.2 dev): the tokenizer alone (AutoProcessor falls back
    # to it; PixtralProcessor's image processor needs torchvision)
    snap = _snapshot("hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor")
    if not (snap / "tokenizer_config.json").exists():
        from sdlens.testing import mistral_tokenizer

        tok = mistral_tokenizer()
        tok.save_pretrained(snap)
        # AutoProcessor reads a config.json when no processor config names its class: a Mistral
        # one (no processor of its own: AutoTokenizer)
        transformers.MistralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=37,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2).save_pretrained(snap)
    made["hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor"] = (
        "sdlens.testing.mistral_tokenizer alone (byte-level BPE of ~700 pieces trained here with "
        "Tekken's split, its control tokens at their real ids and the system / user chat "
        "template); AutoProcessor loads it as the tokenizer, no PixtralProcessor (torchvision)")
    return made


# ============================================================== the pytest plugin (-p ...)
_MODE = os.environ.get("SDLENS_CHECK_MODE")
_OUT = os.environ.get("SDLENS_CHECK_OUT")
_REPORT = {"outcomes": {}, "sdlens_exceptions": [], "changed": [], "refused": [],
           "traced_calls": 0}


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


def _state(pipe) -> dict:
    """What a traced call must leave as it found it."""
    import torch
    from torch.nn.modules import module as tmod

    s = {"class": type(pipe).__qualname__}
    sched = getattr(pipe, "scheduler", None)
    if sched is not None:
        s["scheduler"] = (type(sched).__qualname__, "step" in vars(sched))
    s["global hooks"] = tuple(len(getattr(tmod, n, {})) for n in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"))
    sdlens_dir = str(Path(__file__).resolve().parents[1] / "sdlens")
    for name, comp in pipe.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        for mname, m in comp.named_modules():
            key = f"{name}.{mname}" if mname else name
            proc = getattr(m, "processor", None)
            if proc is not None:
                s[key + " processor"] = id(proc)
            for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
                fns = getattr(m, h, {})
                if fns:  # (others' hooks, sdlens's hooks): the others may add theirs (transformers
                    # puts its output-capturing hooks on at the first call), never lose them
                    ours = {k for k, f in fns.items() if _in_sdlens(f, sdlens_dir)}
                    s[f"{key} {h}"] = _Hooks(frozenset(fns) - ours, frozenset(ours))
            if "forward" in vars(m):
                s[key + " forward"] = id(vars(m)["forward"])
            for attr, v in vars(m).items():
                if _in_sdlens(v, sdlens_dir):
                    s[f"{key}.{attr} (sdlens object)"] = id(v)
    return s


def _in_sdlens(obj, sdlens_dir: str) -> bool:
    """An sdlens object, or a function / bound method / partial whose code is in sdlens/."""
    if (getattr(type(obj), "__module__", "") or "").startswith("sdlens"):
        return True
    f = getattr(obj, "func", obj)  # functools.partial
    f = getattr(f, "__func__", f)  # bound method
    return getattr(getattr(f, "__code__", None), "co_filename", "").startswith(sdlens_dir)


class _Hooks(tuple):
    """(others' hook ids, sdlens's hook ids) of one module: "unchanged" when none of the others'
    is gone and sdlens's are as before."""

    def __new__(cls, others, ours):
        return super().__new__(cls, (others, ours))

    def __eq__(self, other):
        if not isinstance(other, _Hooks):
            return False
        return self[0] <= other[0] and self[1] == other[1]

    __hash__ = tuple.__hash__


def _origin(exc: BaseException) -> dict | None:
    """Where ``exc`` was raised, if that is sdlens's code: the innermost frame of sdlens,
    diffusers, transformers or the tests it passed through is in sdlens/ (this file's frames and
    torch / the standard library are not looked at)."""
    sdlens_dir = str(REPO / "sdlens") + os.sep
    own = str(Path(__file__).resolve())
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != own]
    for f in reversed(frames):
        p = f.filename
        if p.startswith(sdlens_dir):
            return {"frame": f"{os.path.relpath(p, REPO)}:{f.lineno} in {f.name}",
                    "line": (f.line or "").strip()}
        if any(s in p for s in (f"{os.sep}diffusers{os.sep}", f"{os.sep}transformers{os.sep}",
                                str(TESTS))):
            return None
    return None


def _traced_call(orig):
    @functools.wraps(orig)  # inspect.signature(...) is the original's: sdlens reads it
    def call(self, *args, **kwargs):
        import sdlens

        if getattr(type(self), "_sdlens_traced", False):  # sdlens's own call of the original
            return orig(self, *args, **kwargs)
        test = _current_test()
        try:
            session = sdlens.trace(self)
        except TypeError as e:  # a pipeline sdlens says it cannot trace: runs untraced
            _REPORT["refused"].append({"test": test, "class": type(self).__name__,
                                       "error": str(e)[:300]})
            return orig(self, *args, **kwargs)
        before = _state(self)
        _REPORT["traced_calls"] += 1
        try:
            with session:
                return self(*args, **kwargs)
        except BaseException as e:
            where = _origin(e)
            if where is not None:
                _REPORT["sdlens_exceptions"].append({
                    "test": test, "class": type(self).__name__, "type": type(e).__name__,
                    "message": str(e)[:500], **where})
            raise
        finally:
            after = _state(self)
            diff = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
                          and not (k not in before and isinstance(after[k], _Hooks)
                                   and not after[k][1]))  # a module's first hooks, not sdlens's
            if diff:
                _REPORT["changed"].append({"test": test, "class": type(self).__name__,
                                           "what": diff[:20]})
    return call


def pytest_configure(config):
    if _MODE != "traced":
        return
    sys.path.insert(0, str(REPO))
    import diffusers

    from sdlens.engine.arch import SUPPORTED_PIPELINES

    for name in SUPPORTED_PIPELINES:
        cls = getattr(diffusers, name)
        cls.__call__ = _traced_call(cls.__dict__["__call__"])


def pytest_runtest_logreport(report):
    if _MODE is None:
        return
    out = _REPORT["outcomes"]
    if report.when == "call" or report.outcome != "passed":
        if report.nodeid in out and out[report.nodeid]["outcome"] != "passed":
            return  # the first non-pass (setup / call) is the outcome
        entry = {"outcome": "xfailed" if hasattr(report, "wasxfail") and report.skipped
                 else report.outcome}
        if report.skipped:
            lr = report.longrepr
            entry["reason"] = (lr[2] if isinstance(lr, tuple) else str(lr))[:200]
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            entry["error"] = (crash.message if crash else str(report.longrepr))[:300]
            entry["sdlens_frames"] = "/sdlens/" in str(report.longrepr)
        out[report.nodeid] = entry


def pytest_sessionfinish(session, exitstatus):
    if _MODE is None or not _OUT:
        return
    Path(_OUT).write_text(json.dumps(_REPORT, indent=1))


# ============================================================== the driver
def raw_path(path: str, mode: str) -> Path:
    return WORK / "diffusers-check" / mode / (path.replace("/", "__") + ".json")


def run_file(path: str, mode: str, timeout: int) -> dict:
    out = raw_path(path, mode)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    env = dict(os.environ, SDLENS_CHECK_MODE=mode, SDLENS_CHECK_OUT=str(out),
               HF_HUB_CACHE=str(HUB), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "benchmarks"), str(REPO), str(SITE)]))
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "check_diffusers_tests",
                            "-p", "no:cacheprovider", "--tb=short", "-W", "ignore::DeprecationWarning",
                            "-k", SELECT, f"tests/pipelines/{path}"], cwd=TESTS, env=env, capture_output=True,
                           text=True, timeout=timeout)
        tail = (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        tail = "TIMEOUT"
    r = json.loads(out.read_text()) if out.exists() else {"outcomes": {}, "crashed": tail}
    r["seconds"] = round(time.monotonic() - t0, 1)
    r["tail"] = tail[-600:]
    out.write_text(json.dumps(r, indent=1))  # --resume takes it from here
    return r


def resumed(path: str, mode: str, previous: dict) -> dict | None:
    """A finished run of ``path`` one ``mode`` from an earlier invocation (its raw file), or
    None. Runs written before the driver kept their time take it from the previous results."""
    f = raw_path(path, mode)
    if not f.exists():
        return None
    r = json.loads(f.read_text())
    if "seconds" not in r:
        r["seconds"] = next((files[path][mode]["seconds"] for files in
                             previous.get("files", {}).values() if path in files), None)
    return r


def file_summary(r: dict) -> dict:
    counts: dict[str, int] = {}
    for o in r["outcomes"].values():
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    out = {"counts": dict(sorted(counts.items())), "seconds": r["seconds"],
           "traced_calls": r.get("traced_calls", 0)}
    if "crashed" in r:
        out["crashed"] = r["crashed"][-300:]
    return out


def compare(raw: dict) -> dict:
    """The summary the json and the markdown carry, from the raw per-file, per-mode results."""
    differ, sdl_exc, changed, refused, skipped, both_fail, crashed = [], [], [], [], {}, {}, []
    counts = {m: {} for m in MODES}
    tests_run = 0
    for family, files in raw["files"].items():
        for path, modes in files.items():
            u, t = modes["untraced"], modes["traced"]
            for m in MODES:
                if "crashed" in modes[m]:
                    crashed.append({"file": path, "mode": m, "tail": modes[m]["crashed"][-300:]})
                for o in modes[m]["outcomes"].values():
                    counts[m][o["outcome"]] = counts[m].get(o["outcome"], 0) + 1
            for node in sorted(u["outcomes"].keys() | t["outcomes"].keys()):
                a, b = u["outcomes"].get(node), t["outcomes"].get(node)
                oa, ob = (a or {}).get("outcome"), (b or {}).get("outcome")
                if oa != ob:
                    differ.append({"test": node, "untraced": oa, "traced": ob,
                                   "traced_error": (b or {}).get("error"),
                                   "untraced_error": (a or {}).get("error")})
                elif oa == "skipped":
                    why = a.get("reason", "")
                    skipped[why] = skipped.get(why, 0) + 1
                elif oa == "failed":
                    both_fail[node] = a.get("error", "")
                if oa in ("passed", "failed") or ob in ("passed", "failed"):
                    tests_run += 1
            sdl_exc += t.get("sdlens_exceptions", [])
            changed += t.get("changed", [])
            refused += t.get("refused", [])
    return {
        "tests_run": tests_run,
        "outcomes_differing": len(differ), "sdlens_exceptions": len(sdl_exc),
        "pipelines_changed": len(changed),
        "traced_calls": sum(f["traced"].get("traced_calls", 0)
                            for files in raw["files"].values() for f in files.values()),
        "trace_refused": len(refused),
        "counts": counts,
        "differing": differ, "sdlens_exception_list": sdl_exc, "changed_list": changed,
        "refused_list": refused[:50],
        "skipped_reasons": dict(sorted(skipped.items(), key=lambda kv: -kv[1])),
        "failing_both_ways": both_fail, "crashed": crashed,
    }


def render(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# diffusers' fast tests, untraced and traced",
        "",
        f"Written by `benchmarks/check_diffusers_tests.py` from "
        f"`{result.get('json', 'diffusers_tests.json')}`; do not edit.",
        "",
        f"diffusers tests at commit `{result['diffusers_tests_commit']}` ({result['tests_note']}); "
        f"installed diffusers {result['versions']['diffusers']}, transformers "
        f"{result['versions']['transformers']}, torch {result['versions']['torch']}. "
        f"Families: {', '.join(result['families'])}. Selection: {result['selection']}. "
        f"sdlens at commit `{result.get('sdlens_commit') or 'not recorded'}`.",
        "",
        "| tests run | outcomes differing | sdlens exceptions | pipelines changed | traced pipeline calls | trace refused |",
        "|---|---|---|---|---|---|",
        f"| {s['tests_run']} | **{s['outcomes_differing']}** | **{s['sdlens_exceptions']}** | "
        f"**{s['pipelines_changed']}** | {s['traced_calls']} | {s['trace_refused']} |",
        "",
        "Outcomes per run: " + "; ".join(
            f"{m}: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items()))
            for m, c in s["counts"].items()) + ".",
        "",
        "## Per file",
        "",
        "| family | file | untraced | traced | wall s, untraced / traced (a shared, loaded "
        "machine, 2 files at once: not an overhead figure) |",
        "|---|---|---|---|---|",
    ]
    for family, files in result["files"].items():
        for path, modes in files.items():
            cells = []
            for m in MODES:
                c = modes[m]["counts"]
                cells.append(", ".join(f"{n} {k}" for k, n in sorted(c.items()))
                             + (" (crashed)" if "crashed" in modes[m] else ""))
            lines.append(f"| {family} | `{path}` | {cells[0]} | {cells[1]} | "
                         f"{modes['untraced']['seconds']} / {modes['traced']['seconds']} |")
    lines += ["", "## Outcomes that differ", ""]
    lines += [f"- `{d['test']}`: untraced {d['untraced']}, traced {d['traced']}"
              + (f" — {d['traced_error']}" if d.get("traced_error") else "")
              for d in s["differing"]] or ["None."]
    lines += ["", "## Exceptions raised from sdlens's code", ""]
    lines += [f"- `{e['test']}` ({e['class']}): {e['type']}: {e['message'][:200]} at `{e['frame']}`"
              for e in s["sdlens_exception_list"]] or ["None."]
    lines += ["", "## Pipelines left changed after a traced call", ""]
    lines += [f"- `{c['test']}` ({c['class']}): {', '.join(c['what'])}"
              for c in s["changed_list"]] or ["None."]
    if s["refused_list"]:
        lines += ["", "## Calls sdlens.trace refused (run untraced)", ""]
        lines += [f"- `{r['test']}` ({r['class']}): {r['error'][:200]}" for r in s["refused_list"]]
    if result.get("not_run"):
        lines += ["", "## Not run (time)", ""] + [f"- `{p}`" for p in result["not_run"]]
    lines += ["", "## Stand-ins for the hub (unreachable here)", ""]
    lines += [f"- `{k}`: {v}" for k, v in result["stand_ins"].items()]
    lines += ["", "## Skipped (the same in both runs), by reason", "",
              "| tests | reason |", "|---|---|"]
    lines += [f"| {n} | {why.replace('|', '/')} |" for why, n in s["skipped_reasons"].items()]
    lines += ["", f"## Failing in both runs ({len(s['failing_both_ways'])}: cannot run here)", "",
              "The first line of each error (the same test fails the same way untraced):", ""]
    by_error: dict[str, int] = {}
    for err in s["failing_both_ways"].values():
        key = (err or "").splitlines()[0][:150] if err else "?"
        by_error[key] = by_error.get(key, 0) + 1
    lines += ["| tests | error |", "|---|---|"]
    lines += [f"| {n} | {e.replace('|', '/')} |"
              for e, n in sorted(by_error.items(), key=lambda kv: -kv[1])]
    if s["crashed"]:
        lines += ["", "## Runs that crashed", ""]
        lines += [f"- `{c['file']}` ({c['mode']}): {c['tail'][-200:]}" for c in s["crashed"]]
    return "\n".join(lines) + "\n"


def write(out: Path, raw: dict, families: list, stand_ins: dict, versions: dict) -> dict:
    """The json and the markdown from the files run so far (both modes done); a file not yet run
    (or run one way only) is named under ``not_run``."""
    done = {fam: {p: modes for p, modes in files.items() if set(modes) == set(MODES)}
            for fam, files in raw["files"].items()}
    import subprocess

    try:  # the sdlens code the traced runs used
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=str(Path(__file__).resolve().parent)).stdout.strip() or None
    except OSError:
        commit = None
    result = {
        "json": out.name,
        "sdlens_commit": commit,
        "diffusers_tests_commit": DIFFUSERS_COMMIT,
        "tests_note": "huggingface/diffusers main of 2026-08-23, the newest commit in the "
                      "mirror; it has no v0.42.1 tag or release branch",
        "versions": versions, "families": families, "stand_ins": stand_ins,
        "selection": f"tests/pipelines/<file> -k '{SELECT}', -q, OMP_NUM_THREADS=1",
        "not_run": [p for fam, files in raw["files"].items() for p in files
                    if p not in done[fam]],
        "summary": compare({"files": done}),
        "files": {fam: {p: {m: file_summary(r) for m, r in modes.items()}
                        for p, modes in files.items()} for fam, files in done.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(result))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(FAMILIES), help="these families")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per file and mode")
    ap.add_argument("--jobs", type=int, default=1, help="pytest processes at once")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs an earlier invocation finished (benchmarks/_work)")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown")
    ap.add_argument("--out", type=Path, default=RESULTS / "diffusers_tests.json")
    args = ap.parse_args(argv)
    md = args.out.with_suffix(".md")
    if args.render:
        md.write_text(render(json.loads(args.out.read_text())))
        return
    unpack_tests()
    install_test_deps()
    stand_ins = build_hub()
    import diffusers
    import torch
    import transformers

    families = args.only or list(FAMILIES)
    versions = {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__}
    raw = {"files": {fam: {p: {} for p in FAMILIES[fam]} for fam in families}}
    lock = threading.Lock()

    def one(fam, path, mode):
        r = run_file(path, mode, args.timeout)
        with lock:
            raw["files"][fam][path][mode] = r
            print(f"{fam:12s} {path:55s} {mode:9s} {len(r['outcomes']):4d} tests "
                  f"{r['seconds']:7.1f} s", flush=True)
            write(args.out, raw, families, stand_ins, versions)

    # one file of every family first, then the second of each, ...: a run cut short still
    # covers every family
    order = [(fam, p) for i in range(max(len(FAMILIES[f]) for f in families))
             for fam in families for p in FAMILIES[fam][i:i + 1]]
    previous = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    jobs = []
    for fam, p in order:
        for m in MODES:
            r = resumed(p, m, previous) if args.resume else None
            if r is None:
                jobs.append((fam, p, m))
            else:
                raw["files"][fam][p][m] = r
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for f in concurrent.futures.as_completed([pool.submit(one, *j) for j in jobs]):
            f.result()
    result = write(args.out, raw, families, stand_ins, versions)
    s = result["summary"]
    print(f"tests run {s['tests_run']}; outcomes differing {s['outcomes_differing']}; sdlens "
          f"exceptions {s['sdlens_exceptions']}; pipelines changed {s['pipelines_changed']}")


if __name__ == "__main__":
    main()
