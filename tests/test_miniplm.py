"""data.miniplm against scores computed by hand: one plain float64 forward per window of each document,
the selection by a hand sort; a run interrupted after its first chunk resumes to the same output;
bad input is refused by name."""

import json
import os

import datasets
import numpy as np
import pytest
import torch

import data.miniplm as miniplm_module
from core.cli import run_main
from data.loader import load_prepared
from data.miniplm import main as miniplm_main
from data.miniplm import miniplm
from data.prepare import prepare
from tests.tiny_models import llama, save_model

WINDOW = 24  # shorter than most demo documents at this tokenizer: they are scored in several windows
CHUNK = 10


@pytest.fixture(scope="module")
def corpus(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("miniplm")
    lines = [line for line in open(demo_dir / "pretrain/train.txt", encoding="utf-8") if line.strip()][:24]
    path = root / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return root, str(path), [line.rstrip("\n") for line in lines]


@pytest.fixture(scope="module")
def models(corpus, tokenizer):
    root = corpus[0]
    # The teacher's head has padded rows (520 > 512 tokens): they must not enter the log-softmax.
    return (save_model(llama(520, hidden=32, layers=2), root / "teacher", tokenizer, seed=1),
            save_model(llama(512, hidden=16, layers=1), root / "reference", tokenizer, seed=2))


def _hand_sums(path, tokenizer, texts):
    """Per document: sum of log p(token) over EOS + document + EOS, windows of WINDOW predictions,
    each window one unpadded float64 forward; log-softmax over the tokenizer's 512 tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).double().eval()
    eos, sums, counts = tokenizer.eos_token_id, [], []
    with torch.no_grad():
        for text in texts:
            ids = [eos] + tokenizer.encode(text, add_special_tokens=False) + [eos]
            total = 0.0
            for start in range(0, len(ids) - 1, WINDOW):
                piece = torch.tensor([ids[start:start + WINDOW + 1]])
                logits = model(input_ids=piece[:, :-1]).logits[0, :, :len(tokenizer)]
                total += torch.log_softmax(logits, -1).gather(-1, piece[0, 1:, None]).sum().item()
            sums.append(total)
            counts.append(len(ids) - 1)
    return np.array(sums), np.array(counts)


def _args(corpus, models, tokenizer_dir, out, *extra):
    return ["--input", corpus[1], "--tokenizer", str(tokenizer_dir), "--teacher", models[0], "--reference",
            models[1], "--seq-len", "32", "--out", str(out), "--window", str(WINDOW), "--batch-tokens", "200",
            "--chunk-documents", str(CHUNK), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def straight(corpus, models, tokenizer_dir):
    out = corpus[0] / "straight"
    assert run_main(miniplm_main, _args(corpus, models, tokenizer_dir, out)) == 0
    return out


def _chunks(out):
    names = sorted(os.listdir(out / "scores"))
    return [json.load(open(out / "scores" / name)) for name in names]


def test_scores_selection_and_manifest_match_a_hand_computation(straight, corpus, models, tokenizer, tokenizer_dir,
                                                               tmp_path):
    texts = corpus[2]
    teacher, counts = _hand_sums(models[0], tokenizer, texts)
    reference, _ = _hand_sums(models[1], tokenizer, texts)
    chunks = _chunks(straight)
    assert len(chunks) == 3 and [len(chunk["tokens"]) for chunk in chunks] == [10, 10, 4]
    assert [n for chunk in chunks for n in chunk["tokens"]] == counts.tolist()
    assert max(counts) > 2 * WINDOW  # some documents span three windows or more
    # fp32 batched, right-padded forwards against unpadded float64 ones.
    for name, hand in (("teacher", teacher), ("reference", reference)):
        np.testing.assert_allclose([s for chunk in chunks for s in chunk[name]["sums"]], hand, rtol=2e-6)
    scores = teacher / counts - reference / counts
    kept = sorted(sorted(range(len(texts)), key=lambda i: (-scores[i], i))[:12])
    assert np.sort(scores)[::-1][11] - np.sort(scores)[::-1][12] > 1e-4  # the cut is not a near tie
    selected = [json.loads(line)["text"] for line in open(straight / "selected.jsonl")]
    assert selected == [texts[i] for i in kept]
    # The prepared selection is data.prepare's own output for those documents.
    expected = tmp_path / "expected.txt"
    expected.write_text("".join(texts[i] + "\n" for i in kept), encoding="utf-8")
    prepare(str(tokenizer_dir), [str(expected)], str(tmp_path / "expected"), fmt="text", seq_len=32)
    blocks, manifest = load_prepared(str(straight / "prepared"), tokenizer)
    assert blocks["input_ids"] == datasets.load_from_disk(str(tmp_path / "expected"))["input_ids"]
    section = manifest["miniplm"]
    assert section["counts"] == {"documents": 24, "documents_kept": 12, "tokens": int(counts.sum()),
                                 "tokens_kept": int(counts[kept].sum())}
    assert manifest["counts"]["tokens"] == int(counts[kept].sum())
    assert section["request"]["keep"] == 0.5 and section["request"]["teacher"]["path"] == os.path.abspath(models[0])
    assert len(section["request"]["inputs"][0]["sha256"]) == 64
    # A difference of two fp32 means of nearly equal size: absolute, not relative, error.
    assert section["scores"]["kept_min"] == pytest.approx(scores[kept].min(), abs=1e-6)
    for name, hidden, layers, vocab in (("teacher", 32, 2, 520), ("reference", 16, 1, 512)):
        config = llama(vocab, hidden=hidden, layers=layers)
        parameters = (2 * vocab * hidden + hidden + layers * (4 * hidden * hidden + 3 * hidden * 2 * hidden
                                                              + 2 * hidden))
        cost = section["cost"][name]
        assert config.intermediate_size == 2 * hidden and cost["parameters"] == parameters
        assert cost["flops_estimate"] == 2 * parameters * int(counts.sum())
        assert cost["seconds"] == pytest.approx(sum(chunk[name]["seconds"] for chunk in chunks)) and cost["seconds"] > 0


def test_an_interrupted_run_resumes_to_the_same_selection(straight, corpus, models, tokenizer_dir, monkeypatch):
    out = corpus[0] / "resumed"
    scored = []
    real = miniplm_module._score_chunk

    def stop_after_one(*args, **kwargs):
        if scored:
            raise KeyboardInterrupt  # killed while scoring the second chunk
        scored.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(miniplm_module, "_score_chunk", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        miniplm_main(_args(corpus, models, tokenizer_dir, out))
    assert sorted(os.listdir(out / "scores")) == ["chunk-000000.json"] and not (out / "prepared").exists()
    monkeypatch.setattr(miniplm_module, "_score_chunk", real)
    calls = []
    monkeypatch.setattr(miniplm_module, "_score_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    miniplm_main(_args(corpus, models, tokenizer_dir, out))
    assert len(calls) == 2  # only the two missing chunks were scored
    for resumed, whole in zip(_chunks(out), _chunks(straight)):
        assert {key: resumed[key] for key in ("tokens",)} == {key: whole[key] for key in ("tokens",)}
        for name in ("teacher", "reference"):
            assert resumed[name]["sums"] == whole[name]["sums"]  # bitwise: the same batches
    assert (out / "selected.jsonl").read_bytes() == (straight / "selected.jsonl").read_bytes()
    assert (datasets.load_from_disk(str(out / "prepared"))["input_ids"]
            == datasets.load_from_disk(str(straight / "prepared"))["input_ids"])
    # A finished directory of the same request is taken as it is: nothing is scored again.
    monkeypatch.setattr(miniplm_module, "_score_chunk", lambda *a, **k: pytest.fail("scored a finished selection"))
    section = miniplm([corpus[1]], str(tokenizer_dir), models[0], models[1], str(out), seq_len=32, window=WINDOW,
                      batch_tokens=200, chunk_documents=CHUNK)
    assert section == json.load(open(out / "prepared/manifest.json"))["miniplm"]


@pytest.fixture(scope="module")
def odd_models(corpus, tokenizer):
    """A model whose head is narrower than the tokenizer, and one saved with another tokenizer."""
    from transformers import AutoTokenizer

    root = corpus[0]
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<extra>"])
    return (save_model(llama(500, hidden=16, layers=1), root / "narrow", tokenizer),
            save_model(llama(520, hidden=16, layers=1), root / "retokenized", other))


@pytest.mark.parametrize("change, message", [
    ({"--keep": "0"}, "--keep must be in (0, 1], got 0.0"),
    ({"--keep": "1.5"}, "--keep must be in (0, 1], got 1.5"),
    ({"--input": "missing.txt"}, "input file not found: missing.txt"),
    ({"--teacher": "no-such-model"}, "--teacher: no model at no-such-model (config.json is missing)"),
    ({"--reference": "narrow"}, "predicts 500 tokens, fewer than the tokenizer's 512"),
    ({"--teacher": "retokenized"}, "was saved with another tokenizer (vocabulary 513)"),
    ({"--keep": "0.25"}, "holds another selection: its keep is 0.5, this run's is 0.25"),
    ({"--window": "0"}, "--window must be >= 1, got 0"),
    ({"--batch-tokens": "10"}, "--batch-tokens (10) must hold one window of 24 tokens"),
])
def test_bad_input_is_refused_by_name(change, message, straight, corpus, models, odd_models, tokenizer_dir, capsys):
    args = _args(corpus, models, tokenizer_dir, straight)
    named = {"narrow": odd_models[0], "retokenized": odd_models[1]}
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = named.get(value, value)
        else:
            args += [flag, value]
    assert run_main(miniplm_main, args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and message in error, error


def test_the_sweep_makes_the_selection_once_and_reports_its_cost(corpus, models, tokenizer_dir, monkeypatch):
    """eval.sweep's miniplm setting: the reference trained once (its command checked, the training stood in
    for by a saved model), data.miniplm run on data.train's raw inputs, the runs' data.train pointed at
    the selection, and the selection's cost in summary.json and report.md."""
    import argparse
    import re
    import shutil
    from types import SimpleNamespace

    from core.errors import ConfigError
    from eval import sweep, sweep_miniplm, sweep_runs
    from eval.report import write_sweep_report

    root = corpus[0] / "sweep"
    prepare(str(tokenizer_dir), [corpus[1]], str(root / "train"), fmt="text", seq_len=32)
    cfg = SimpleNamespace(tokenizer=str(tokenizer_dir), teacher=SimpleNamespace(path=models[0]),
                          data=SimpleNamespace(train=str(root / "train"), eval=str(root / "train")))
    args = sweep.resolve_grid(sweep.build_parser().parse_args([
        "--config", "c", "--out", str(root / "out"), "--losses", "kl,miniplm", "--seeds", "0",
        "--set", "parallel.tensor_parallel=1", "--set", "train.max_steps=3", "--miniplm-keep", "0.25"]))
    commands = []

    def run_logged(command, log, env=None):
        commands.append(command)
        if "launch.distill" in command:  # the reference's training, stood in for by a saved tiny model
            output_dir = next(item.split("=", 1)[1] for item in command if item.startswith("output_dir="))
            shutil.copytree(models[1], os.path.join(output_dir, "student"))
            return 0
        assert command[1:3] == ["-m", "data.miniplm"]
        return run_main(miniplm_main, command[3:] + ["--window", str(WINDOW), "--device", "cpu"])

    monkeypatch.setattr(sweep_runs, "run_logged", run_logged)
    grid = sweep.settings(args.losses, args.top_k, args.beta, args.temperature)
    miniplm_setting = grid[-1]
    assert miniplm_setting.name == "miniplm" and miniplm_setting.kind == "ce"
    prepared = {}
    assert sweep._prepare_once(prepared, args, cfg, miniplm_setting) is None
    assert sweep._prepare_once(prepared, args, cfg, miniplm_setting) is None  # once per sweep
    reference, selection = commands
    assert reference[reference.index("--config") + 1] == "launch/configs/demo_miniplm_reference.yaml"
    sets = [reference[i + 1] for i, item in enumerate(reference) if item == "--set"]
    assert sets == [f"output_dir={root}/out/miniplm/reference", f"data.train={root}/train",
                    f"data.eval={root}/train", f"tokenizer={tokenizer_dir}", "parallel.tensor_parallel=1"]
    assert selection[selection.index("--input") + 1] == corpus[1] and "0.25" in selection
    selected = f"{root}/out/miniplm/selection/prepared"
    assert miniplm_setting.overrides(args) == ["loss.kind=ce", f"data.train={selected}"]
    assert json.load(open(os.path.join(selected, "manifest.json")))["miniplm"]["counts"]["documents_kept"] == 6
    recorded = json.load(open(f"{root}/out/miniplm/reference/reference.json"))
    assert recorded["config"] == "launch/configs/demo_miniplm_reference.yaml" and len(recorded["config_sha256"]) == 64
    # A restarted sweep reuses the selection of the same request without running data.miniplm, even
    # with its reference gone; another keep fraction makes a new one (here: the reference retrained).
    monkeypatch.setattr(miniplm_module, "_score_chunk", lambda *a, **k: pytest.fail("scored again"))
    shutil.rmtree(f"{root}/out/miniplm/reference/student")
    assert sweep._prepare_once({}, args, cfg, miniplm_setting) is None and len(commands) == 2
    assert not sweep_miniplm._selection_done(argparse.Namespace(**{**vars(args), "miniplm_keep": 0.5}), cfg, None)
    # Another reference config than the one recorded is refused by name, up front and when preparing.
    other = argparse.Namespace(**{**vars(args), "miniplm_reference": "launch/configs/demo_teacher.yaml"})
    message = "--miniplm-reference launch/configs/demo_teacher.yaml: this sweep's reference .* was trained with " \
              "launch/configs/demo_miniplm_reference.yaml"
    with pytest.raises(ConfigError, match=message):
        sweep_miniplm.check_reference(other)

    run = root / "out" / "miniplm" / "seed0"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"metrics": {"nll": 2.0}}))
    sweep_runs.add_train_seconds(str(run), 30.0)
    sweep_runs.add_train_seconds(str(run), 10.0)  # a resumed run adds its seconds
    summary = sweep.summarise(args.out, grid, [0], {})
    assert summary["settings"][-1]["train_seconds"] == 40.0
    [cost] = summary["miniplm"]
    assert cost["setting"] == "miniplm" and cost["keep"] == 0.25 and cost["reference_train_seconds"] > 0
    assert cost["scoring"]["teacher"]["flops_estimate"] > cost["scoring"]["reference"]["flops_estimate"] > 0
    write_sweep_report(args.out, summary, sweep.METRICS, [0], "python -m eval.sweep ...")
    report = open(os.path.join(args.out, "report.md")).read()
    assert "| miniplm | 40 |" in report and "miniplm's selection, made once for all its seeds" in report
    assert f"teacher {cost['scoring']['teacher']['seconds']:.1f} s" in report
    # Without its selection, preparing refuses that config too (before any training).
    shutil.rmtree(f"{root}/out/miniplm/selection")
    assert re.match(message, sweep_miniplm._prepare_miniplm(other, cfg, None)) and len(commands) == 2


def test_the_sweep_refuses_miniplm_on_sft_data_and_a_bad_fraction(corpus, tokenizer_dir, demo_dir, capsys):
    from types import SimpleNamespace

    from core.errors import ConfigError
    from eval import sweep, sweep_miniplm

    args = sweep.resolve_grid(sweep.build_parser().parse_args(
        ["--config", "c", "--out", str(corpus[0] / "sft-sweep"), "--losses", "miniplm", "--miniplm-keep", "2"]))
    with pytest.raises(ConfigError, match=r"--miniplm-keep must be in \(0, 1\], got 2.0"):
        sweep._check_arguments(args)
    sft = corpus[0] / "sft"
    prepare(str(tokenizer_dir), [str(demo_dir / "sft/eval.jsonl")], str(sft), fmt="sft", seq_len=64)
    cfg = SimpleNamespace(tokenizer=str(tokenizer_dir), teacher=SimpleNamespace(path="t"),
                          data=SimpleNamespace(train=str(sft), eval=str(sft)))
    with pytest.raises(ConfigError, match="miniplm selects pre-training documents; data.train .* is 'sft' data"):
        sweep_miniplm.miniplm_command(args, cfg, None)
    # main refuses the same before any run starts, and a missing reference config or --teachers path.
    grid = sweep.settings(args.losses, args.top_k, args.beta, args.temperature)
    with pytest.raises(ConfigError, match="miniplm selects pre-training documents"):
        sweep._check_inputs(args, cfg, grid)
    text = corpus[0] / "text"
    prepare(str(tokenizer_dir), [corpus[1]], str(text), fmt="text", seq_len=32)
    cfg.data.train = str(text)
    args.miniplm_reference = "launch/configs/no_such_reference.yaml"
    with pytest.raises(ConfigError, match="--miniplm-reference launch/configs/no_such_reference.yaml: no such config"):
        sweep._check_inputs(args, cfg, grid)
    args.teachers = [sweep.Teacher("big", str(corpus[0] / "no_teacher"))]
    with pytest.raises(ConfigError, match="--teachers big=.*no_teacher: no such path"):
        sweep._check_inputs(args, cfg, grid)
    # Without miniplm, data.train that is not prepared only warns: the tail metrics will be missing.
    args.teachers, cfg.data.train = None, str(corpus[1])
    sweep._check_inputs(args, cfg, sweep.settings(["kl"], [5], [1.0], [1.0]))
    assert "the tail metrics (nll_rare, ...) will be missing" in capsys.readouterr().err


def test_bfloat16_weights_score_close_to_float32(models, tokenizer, corpus):
    """--dtype bfloat16: the same sums within bf16's precision (8 bits of mantissa: about 0.4% per
    logit, a few percent on a sum of log-probabilities of random models)."""
    from transformers import AutoModelForCausalLM

    from data.miniplm import sum_log_probs

    documents = [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
                 for text in corpus[2][:6]]
    sums = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(models[0], dtype=dtype).eval()
        sums[dtype] = sum_log_probs(model, documents, vocab=len(tokenizer), window=WINDOW, batch_tokens=200,
                                    context_id=tokenizer.eos_token_id)
    assert sums[torch.bfloat16].dtype == np.float64 and not np.array_equal(sums[torch.bfloat16], sums[torch.float32])
    np.testing.assert_allclose(sums[torch.bfloat16], sums[torch.float32], rtol=3e-2)
