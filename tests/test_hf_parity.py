"""Golden tests: every architecture and head matches `transformers` after a save/load both ways."""

import pytest
import torch
import transformers as T

from lmforge.models import from_pretrained, generate, save_pretrained

V = 99  # tiny vocab; id 0 pads BERT/GPT-2, id 1 pads RoBERTa
TINY = {
    "bert": T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64, pad_token_id=0),
    "roberta": T.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=66, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2),
    "gpt2": T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                         bos_token_id=V - 1, eos_token_id=V - 1, pad_token_id=0),
}
# (model_type, Hugging Face class, our head, num_labels)
CASES = [
    ("bert", "BertModel", None, None),
    ("bert", "BertForMaskedLM", "mlm", None),
    ("bert", "BertForNextSentencePrediction", "nsp", None),
    ("bert", "BertForPreTraining", "pretraining", None),
    ("bert", "BertForSequenceClassification", "classification", 3),
    ("bert", "BertForSequenceClassification", "classification", 1),
    ("bert", "BertForTokenClassification", "token-classification", 5),
    ("bert", "BertForTokenClassification", "scalar", 1),
    ("roberta", "RobertaModel", None, None),
    ("roberta", "RobertaForMaskedLM", "mlm", None),
    ("roberta", "RobertaForSequenceClassification", "classification", 3),
    ("roberta", "RobertaForTokenClassification", "token-classification", 4),
    ("roberta", "RobertaForTokenClassification", "scalar", 1),
    ("gpt2", "GPT2Model", None, None),
    ("gpt2", "GPT2LMHeadModel", "causal-lm", None),
    ("gpt2", "GPT2ForSequenceClassification", "classification", 3),
    ("gpt2", "GPT2ForTokenClassification", "token-classification", 4),
    ("gpt2", "GPT2ForSequenceClassification", "scalar", 1),
]


def random_hf_model(model_type, cls_name, num_labels, seed=0):
    torch.manual_seed(seed)
    config = TINY[model_type].__class__.from_dict(TINY[model_type].to_dict())
    if num_labels:
        config.num_labels = num_labels
    model = getattr(T, cls_name)(config).eval()
    with torch.no_grad():  # random everything, so that a swapped bias or LayerNorm cannot hide
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def batch(model_type, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 1, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 1 if model_type == "roberta" else 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, (types * mask if model_type != "gpt2" else None)


def hf_outputs(model, head, ids, mask, types):
    kw = {"token_type_ids": types} if types is not None else {}
    out = model(input_ids=ids, attention_mask=mask, **kw)
    if head is None:
        return {"hidden": out.last_hidden_state, "pooled": getattr(out, "pooler_output", None)}
    if head == "pretraining":
        return {"logits": out.prediction_logits, "nsp": out.seq_relationship_logits}
    if head == "scalar" and out.logits.dim() == 3:
        return {"values": out.logits[..., 0]}
    if head == "scalar":
        return {"reward": out.logits[:, 0]}
    return {"logits": out.logits}


def our_outputs(model, head, ids, mask, types):
    out = model(ids, attention_mask=mask, token_type_ids=types)
    if head is None:
        return {"hidden": out.hidden_states, "pooled": out.pooled}
    if head == "pretraining":
        return {"logits": out.logits, "nsp": out.nsp_logits}
    if head == "scalar":
        return {"values": out.values} if model.config.model_type != "gpt2" else {"reward": out.logits}
    return {"logits": out.logits}


def assert_close(ours, theirs, mask):
    assert ours.keys() == theirs.keys()
    for k in ours:
        if theirs[k] is None:
            assert ours[k] is None, k
            continue
        a, b = ours[k], theirs[k]
        assert a.shape == b.shape, (k, a.shape, b.shape)
        if a.dim() >= 2 and a.shape[:2] == mask.shape:  # per token: padding positions are don't-care
            keep = mask.bool()
            a, b = a[keep], b[keep]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("model_type,cls_name,head,num_labels", CASES,
                         ids=[f"{c[1]}-{c[2]}-{c[3]}" for c in CASES])
@torch.no_grad()
def test_parity_both_ways(tmp_path, model_type, cls_name, head, num_labels):
    ref = random_hf_model(model_type, cls_name, num_labels)
    ref.save_pretrained(tmp_path / "hf")
    extra = {"num_labels": num_labels} if num_labels else {}
    ours = from_pretrained(tmp_path / "hf", head=head, **extra).eval()
    assert ours.config.head == head
    ids, mask, types = batch(model_type)
    expected = hf_outputs(ref, head, ids, mask, types)
    assert_close(our_outputs(ours, head, ids, mask, types), expected, mask)

    # ours -> disk -> transformers: no missing or unexpected keys, the same outputs
    save_pretrained(ours, tmp_path / "ours")
    back, info = getattr(T, cls_name).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_close(hf_outputs(back.eval(), head, ids, mask, types), expected, mask)
    # and our own reload keeps the head type (scalar is marked in config.json)
    again = from_pretrained(tmp_path / "ours").eval()
    assert again.config.head == head
    assert_close(our_outputs(again, head, ids, mask, types), expected, mask)


@torch.no_grad()
def test_greedy_decoding_matches_transformers(tmp_path):
    ref = random_hf_model("gpt2", "GPT2LMHeadModel", None, seed=3)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(0)
    for length in (1, 5, 9):
        prompt = torch.randint(1, V - 1, (1, length), generator=g)
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                            do_sample=False, pad_token_id=0)
        got = generate(ours, prompt, max_new_tokens=30)
        assert got.tolist() == want.tolist()


@torch.no_grad()
def test_kv_cache_matches_full_forward_and_left_padding(tmp_path):
    """Incremental decoding equals recomputing the whole prefix; a left-padded row decodes as if alone."""
    ref = random_hf_model("gpt2", "GPT2LMHeadModel", None, seed=4)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, eos_token_id=None).eval()
    a = torch.tensor([[5, 6, 7, 8, 9, 10]])
    b = torch.tensor([[11, 12, 13]])
    alone = [generate(ours, p, max_new_tokens=12)[0, p.shape[1]:] for p in (a, b)]
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    both = generate(ours, ids, attention_mask=mask, max_new_tokens=12)[:, 6:]
    assert both[0].tolist() == alone[0].tolist() and both[1].tolist() == alone[1].tolist()
    full = ours(torch.cat([a, alone[0][None]], 1)).logits
    cache = ours.new_cache(1, 18)
    step = [ours(a, cache=cache).logits]
    for t in alone[0][:-1]:
        step.append(ours(t.view(1, 1), cache=cache).logits)
    torch.testing.assert_close(torch.cat(step, 1), full[:, :-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,cls_name", [("bert", "BertForMaskedLM"), ("roberta", "RobertaForMaskedLM")])
def test_mlm_training_steps_match_transformers(tmp_path, model_type, cls_name):
    """Training, not only the forward: from the same weights, the pre-training objective (logits at the
    masked positions only, our kernels' backward) and AdamW take the same steps as transformers' model
    with its own loss; after 8 steps the losses and every weight still agree."""
    from lmforge.train.objectives import MaskedLM

    config = TINY[model_type].__class__.from_dict(TINY[model_type].to_dict())
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    ref = getattr(T, cls_name)(config)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, head="mlm")
    g = torch.Generator().manual_seed(2)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ours, ref)]
    for step in range(8):
        ids, mask, types = batch(model_type, seed=10 + step)
        labels = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & mask.bool(), ids, -100)
        labels[0, 1] = ids[0, 1]                                     # never a batch without a target
        mlm_batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if model_type == "bert":
            mlm_batch["token_type_ids"] = types
        loss, _ = MaskedLM()(ours, mlm_batch)
        want = ref(**mlm_batch).loss
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        for opt, value in zip(opts, (loss, want)):
            value.backward()
            opt.step()
            opt.zero_grad()
    save_pretrained(ours, tmp_path / "ours")
    theirs = dict(ref.named_parameters())
    for name, p in getattr(T, cls_name).from_pretrained(tmp_path / "ours").named_parameters():
        torch.testing.assert_close(p, theirs[name], atol=1e-4, rtol=1e-4, msg=name)
