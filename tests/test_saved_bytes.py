"""training.plan's activation and teacher-forward formulas against bytes counted in the models
themselves, at the real widths of the architectures the job plans for (seq 2048, bf16).

Saved for backward: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd keeps;
the unique storages that are not parameters are summed, for a 2-layer and a 1-layer copy of the
model, and the difference is one decoder layer (embedding, final norm and head cancel). The
teacher's no-grad forward and the logits path: a ``TorchDispatchMode`` tracks every storage an op
makes until it is freed, and reports the most alive at once. At real width both run under ``FakeTensorMode`` (shapes,
dtypes and CPU kernel choice without data); ``test_fake_tensors_count_what_real_tensors_do`` shows
on small layers that it counts exactly what real tensors do.
"""

import contextlib
import weakref
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loss.objective import distillation_objective
from training.plan import activation_bytes, logits_bytes, model_shape, teacher_forward_bytes

SEQ = 2048
VOCAB = 256  # the head and embedding cancel in the difference; small keeps them cheap
LLAMA = {"llama_3.2_1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8),
         "llama_3_8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)}
GEMMA = {"gemma2_1b": "launch/configs/models/gemma2_1b.json", "gemma2_9b": "launch/configs/models/gemma2_9b.json"}
CASES = [(name, attention) for name in LLAMA for attention in ("eager", "sdpa")] + [(name, "eager") for name in GEMMA]


def _config(name, layers, **widths):
    """The architecture ``name`` with ``layers`` decoder layers (and ``widths`` overriding its sizes)."""
    from transformers import AutoConfig, LlamaConfig

    if name in LLAMA:
        return LlamaConfig(**{**LLAMA[name], "vocab_size": VOCAB, "max_position_embeddings": SEQ,
                              "tie_word_embeddings": False, **widths}, num_hidden_layers=layers)
    values = AutoConfig.from_pretrained(GEMMA[name]).to_dict()
    values.pop("layer_types", None)  # rebuilt for the new layer count
    return type(AutoConfig.from_pretrained(GEMMA[name]))(**{**values, "vocab_size": VOCAB, **widths,
                                                            "num_hidden_layers": layers})


def _mode(fake):
    """FakeTensorMode, with transformers told it is not tracing (it would otherwise build the
    causal mask that a real run skips, and repeat the key-value heads for sdpa) and that the
    sequences are not packed (what it finds in a real run's ``arange`` positions, from values a
    fake tensor does not have); or real CPU tensors."""
    if not fake:
        return torch.device("cpu")
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("transformers.masking_utils.is_tracing", lambda *args, **kwargs: False))
    stack.enter_context(mock.patch("transformers.masking_utils.find_packed_sequence_indices", lambda *args: None))
    stack.enter_context(FakeTensorMode())
    return stack


def _model(config, attention):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention)


def _saved_bytes(config, attention, seq, checkpointing, fake):
    """Bytes of the unique non-parameter storages autograd saves in one training forward."""
    with _mode(fake):
        model = _model(config, attention).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in parameters:
                saved[storage._cdata] = storage.nbytes()
            return tensor

        ids = torch.randint(4, VOCAB, (1, seq))  # (1, seq)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, use_cache=False)
    return sum(saved.values())


class _PeakLive(TorchDispatchMode):
    """The most bytes held at once by storages made inside the block (``existing`` excluded)."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.existing:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _no_grad_peak(config, attention, seq, fake):
    """Peak bytes of the decoder stack's no-grad forward above its input embeddings."""
    with _mode(fake):
        model = _model(config, attention).eval()
        with torch.no_grad():
            embeddings = model.get_input_embeddings()(torch.randint(4, VOCAB, (1, seq)))  # (1, seq, H)
            with _PeakLive([*model.parameters(), *model.buffers(), embeddings]) as counted:
                model.model(inputs_embeds=embeddings, use_cache=False)
    return counted.peak


def _shape(config, attention, tmp_path):
    # A path per width: model_shape is cached by path.
    widths = f"{config.hidden_size}-{config.num_hidden_layers}-{config.vocab_size}"
    path = tmp_path / f"{config.model_type}-{widths}-{attention}.json"
    config.to_json_file(str(path))
    return model_shape(str(path), vocab=config.vocab_size, tp=1, attn_implementation=attention)


@pytest.mark.parametrize("name, attention", [("llama_3.2_1b", "eager"), ("llama_3.2_1b", "sdpa"),
                                             ("gemma2_1b", "eager")])
def test_fake_tensors_count_what_real_tensors_do(name, attention):
    """On layers narrowed to 128 wide, sequences of 64: the same bytes saved and the same no-grad
    peak with real tensors as under FakeTensorMode, so the real-width counts below can be fake."""
    narrow = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)
    if name in GEMMA:
        narrow["head_dim"] = 32
    config = _config(name, 2, **narrow)
    for checkpointing in (False, True):
        assert _saved_bytes(config, attention, 64, checkpointing, fake=True) == \
            _saved_bytes(config, attention, 64, checkpointing, fake=False)
    assert _no_grad_peak(config, attention, 64, fake=True) == _no_grad_peak(config, attention, 64, fake=False)


@pytest.mark.parametrize("name, attention", CASES)
def test_planned_saved_bytes_per_layer_match_the_counted(name, attention, tmp_path):
    """One decoder layer at real width, one 2048-token sequence, bf16, without and with activation
    checkpointing: the plan's activation term (training.plan.activation_bytes, 2 layers minus 1)
    within 10% of the bytes autograd saves (counted, 2 layers minus 1)."""
    shapes = {layers: _shape(_config(name, layers), attention, tmp_path) for layers in (1, 2)}
    assert shapes[2].attention == attention
    for checkpointing in (False, True):
        counted = (_saved_bytes(_config(name, 2), attention, SEQ, checkpointing, fake=True) -
                   _saved_bytes(_config(name, 1), attention, SEQ, checkpointing, fake=True))
        planned = (activation_bytes(shapes[2], SEQ, SEQ, 1, 2, checkpointing) -
                   activation_bytes(shapes[1], SEQ, SEQ, 1, 2, checkpointing))
        assert planned == pytest.approx(counted, rel=0.10), (name, attention, checkpointing, planned, counted)


@pytest.mark.parametrize("name, attention", CASES)
def test_planned_teacher_forward_peak_matches_the_counted(name, attention, tmp_path):
    """A 2-layer stack's no-grad forward at real width, one 2048-token sequence, bf16: the plan's
    teacher-forward term within 10% of the most bytes its temporaries hold at once."""
    config = _config(name, 2)
    counted = _no_grad_peak(config, attention, SEQ, fake=True)
    planned = teacher_forward_bytes(_shape(config, attention, tmp_path), SEQ, SEQ, 1, 2)
    assert planned == pytest.approx(counted, rel=0.10), (name, attention, planned, counted)


@pytest.mark.parametrize("name", ["llama_3.2_1b", "gemma2_1b"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["tail", "kl"])  # kl: DeepSpeed's op, not chunked
def test_planned_logits_path_matches_the_counted(name, dtype, kind, tmp_path):
    """The logits path as training.step runs it, on real CPU tensors (256 positions x 32768
    vocabulary; 0-layer models, so only the heads count): the teacher's logits under no_grad, the
    student's, the tail loss with the teacher's logits donated, backward to the student's
    embeddings (parameters frozen: their gradients are the plan's gradient term). The most bytes
    alive at once against training.plan.logits_bytes (CPU loss chunks), within 10%; Gemma-2's final
    soft-capping keeps and back-propagates through [tokens, vocab] tanh tensors."""
    tokens, vocab = 256, 32768
    narrow = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=vocab, **({"head_dim": 16} if name in GEMMA else {}))
    teacher, student = (_model(_config(name, 0, **narrow), "eager").to(dtype) for _ in range(2))
    for parameter in [*teacher.parameters(), *student.parameters()]:
        parameter.requires_grad_(False)
    ids = torch.randint(4, vocab, (1, tokens + 1))  # (1, tokens + 1)
    keep = torch.arange(tokens)  # (tokens,)
    with _PeakLive([*teacher.parameters(), *student.parameters(), ids, keep]) as counted:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, logits_to_keep=keep, use_cache=False).logits.view(tokens, vocab)
        embeddings = student.get_input_embeddings()(ids).requires_grad_()  # (1, tokens + 1, H)
        student_logits = student(inputs_embeds=embeddings, logits_to_keep=keep,
                                 use_cache=False).logits.view(tokens, vocab)
        out = distillation_objective(student_logits, teacher_logits, ids[0, 1:], kind=kind, top_k=10, beta=2.0,
                                     donate_teacher=True)
        out["loss"].sum().backward()
        del out, student_logits, teacher_logits
    shape = _shape(_config(name, 1, **narrow), "eager", tmp_path)
    planned = logits_bytes(shape, tokens, vocab, 2 if dtype == torch.bfloat16 else 4, device_type="cpu",
                           loss_kind=kind)
    assert planned == pytest.approx(counted.peak, rel=0.10), (name, dtype, kind, planned, counted.peak)
