"""The original Transformer (encoder-decoder) against transformers' MarianMTModel, the Hugging Face class
of that architecture (post-norm, sinusoidal positions, embeddings times sqrt(D), one table shared by
the source, the target and the output): same weights, same logits, same greedy and beam outputs.

Marian lays its sinusoids out as [sin | cos] halves, Vaswani et al. (and lmforge) interleave them;
the reference gets lmforge's table, so everything else is compared as it is."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.config import ModelConfig
from lmforge.models.generate import generate
from lmforge.models.model import Model
from lmforge.models.transformer import sinusoids

transformers = pytest.importorskip("transformers")

PAD, START, EOS, V = 0, 1, 2, 61

CONFIGS = {
    "2+2 layers": dict(num_layers=2, num_decoder_layers=2, num_heads=4),
    "1 encoder, 3 decoder layers": dict(num_layers=1, num_decoder_layers=3, num_heads=2),
}


def ours_config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(model_type="encoder-decoder", vocab_size=V, hidden_size=32, intermediate_size=48,
                                 max_position_embeddings=64, type_vocab_size=0, hidden_act="relu",
                                 position_embedding="sinusoidal", layer_norm_eps=1e-5, hidden_dropout=0.0,
                                 attention_dropout=0.0, head="causal-lm", pad_token_id=PAD, bos_token_id=START,
                                 eos_token_id=EOS), **kw})


def marian_names(c: ModelConfig) -> dict[str, str]:
    """Our parameter name -> MarianMTModel's."""
    sub = {"attention.query": "self_attn.q_proj", "attention.key": "self_attn.k_proj",
           "attention.value": "self_attn.v_proj", "attention.output": "self_attn.out_proj",
           "attention_norm": "self_attn_layer_norm", "crossattention.query": "encoder_attn.q_proj",
           "crossattention.key": "encoder_attn.k_proj", "crossattention.value": "encoder_attn.v_proj",
           "crossattention.output": "encoder_attn.out_proj", "crossattention_norm": "encoder_attn_layer_norm",
           "intermediate": "fc1", "output": "fc2", "ffn_norm": "final_layer_norm"}
    out = {"transformer.embeddings.word_embeddings.weight": "model.shared.weight"}
    for ours, theirs, n in (("encoder", "encoder", c.num_layers), ("transformer", "decoder", c.num_decoder_layers)):
        for i in range(n):
            for a, b in sub.items():
                if a.startswith("cross") and ours == "encoder":
                    continue
                for p in ("weight", "bias"):
                    out[f"{ours}.layers.{i}.{a}.{p}"] = f"model.{theirs}.layers.{i}.{b}.{p}"
    return out


def pair(**kw):
    torch.manual_seed(0)
    c = ours_config(**kw)
    ours = Model(c).eval()
    ref = transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=V, d_model=c.hidden_size, encoder_layers=c.num_layers, decoder_layers=c.num_decoder_layers,
        encoder_attention_heads=c.num_heads, decoder_attention_heads=c.num_heads, encoder_ffn_dim=c.intermediate_size,
        decoder_ffn_dim=c.intermediate_size, activation_function="relu", max_position_embeddings=c.max_position_embeddings,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True, pad_token_id=PAD,
        decoder_start_token_id=START, eos_token_id=EOS, forced_eos_token_id=None, bos_token_id=None)).eval()
    theirs = ref.state_dict()
    names = marian_names(c)
    mine = ours.state_dict()
    assert set(names) == set(mine), set(mine) ^ set(names)   # every parameter of ours has its counterpart
    with torch.no_grad():
        for a, b in names.items():
            theirs[b].copy_(mine[a])
        table = sinusoids(c.max_position_embeddings, c.hidden_size)
        ref.model.encoder.embed_positions.weight.copy_(table)
        ref.model.decoder.embed_positions.weight.copy_(table)
    return ours, ref


def sources(seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5, 1]
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):   # right-padded: Marian numbers source positions from 0 regardless of padding
        ids[b, :n] = torch.randint(3, V, (n,), generator=g)
        mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
@torch.no_grad()
def test_logits_equal_marian(kw):
    ours, ref = pair(**kw)
    src, src_mask = sources()
    tgt = torch.cat([torch.full((4, 1), START), torch.randint(3, V, (4, 5), generator=torch.Generator().manual_seed(5))], 1)
    want = ref(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
    got = ours(tgt, encoder_input_ids=src, encoder_attention_mask=src_mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # the decoder's own padding (right) changes nothing at the real tokens
    dmask = torch.ones_like(tgt)
    dmask[1, 3:] = 0
    got = ours(tgt, dmask, encoder_input_ids=src, encoder_attention_mask=src_mask).logits
    torch.testing.assert_close(got[1, :3], want[1, :3], rtol=0, atol=2e-5)
    # encoded once, reused: the same numbers
    memory = ours.encode(src, src_mask)
    torch.testing.assert_close(ours(tgt, memory=memory).logits, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("settings", [
    dict(num_beams=1),
    dict(num_beams=4, length_penalty=0.8),
    dict(num_beams=3, length_penalty=1.0, no_repeat_ngram_size=2),
], ids=["greedy", "beam4", "beam3-norepeat2"])
@torch.no_grad()
def test_generation_equals_marian(settings):
    ours, ref = pair(**CONFIGS["2+2 layers"])
    src, src_mask = sources(seed=8)
    n = 12
    want = ref.generate(input_ids=src, attention_mask=src_mask, max_new_tokens=n, do_sample=False, early_stopping=False,
                        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START, **settings)
    prompts = [row[:int(m.sum())].tolist() for row, m in zip(src, src_mask)]
    got = generate(ours, prompts, max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD, **settings)
    for b, (p, out) in enumerate(zip(prompts, got)):
        assert out[:len(p)] == p                       # each prompt (source) followed by its output
        theirs = want[b, 1:].tolist()                  # after the decoder start token
        if EOS in theirs:
            theirs = theirs[:theirs.index(EOS) + 1]
        assert out[len(p):] == theirs, (b, out[len(p):], theirs)


@torch.no_grad()
def test_decoding_together_equals_decoding_alone():
    ours, _ = pair(**CONFIGS["2+2 layers"])
    src, mask = sources(seed=9)
    prompts = [row[:int(m.sum())].tolist() for row, m in zip(src, mask)]
    together = generate(ours, prompts, max_new_tokens=10, num_beams=2)
    alone = [generate(ours, [p], max_new_tokens=10, num_beams=2)[0] for p in prompts]
    assert together == alone


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    m = Model(ours_config(hidden_dropout=0.1, attention_dropout=0.1, **CONFIGS["2+2 layers"])).train()
    src, mask = sources()
    tgt = torch.randint(3, V, (4, 6))
    logits = m(tgt, encoder_input_ids=src, encoder_attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt.roll(-1, 1).reshape(-1)).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


@pytest.mark.parametrize("kw, message", [
    (dict(head="classification"), "no 'classification' head"),
    (dict(num_decoder_layers=0), "num_decoder_layers must be >= 1"),
    (dict(model_type="bert", head=None), "num_decoder_layers is for encoder-decoder"),
])
def test_config_errors(kw, message):
    from lmforge.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        ours_config(**{"num_decoder_layers": 2, "num_heads": 4, **kw})


def test_inputs_it_cannot_take():
    m = Model(ours_config(**CONFIGS["2+2 layers"])).eval()
    src, mask = sources()
    with pytest.raises(ValueError, match="needs its source"):
        m(torch.tensor([[START]] * 4))
    with pytest.raises(ValueError, match="source has 4 rows but the decoder batch 2"):
        m(torch.tensor([[START]] * 2), encoder_input_ids=src, encoder_attention_mask=mask)
    plain = Model(ModelConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="has no encoder"):
        plain(src, encoder_input_ids=src)
