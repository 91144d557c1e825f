"""Feature pages: a static HTML site about the latents of a dictionary on a model's activations.

For each chosen latent: its density, the top-activating examples with their token
context (each token shaded by the latent's activation there), a histogram of its
non-zero activations, and the tokens its decoder direction promotes and suppresses
through the unembedding (the direct path: ``W_dec,i · M`` with ``M`` the map from the
site to the logits; final-norm scaling is ignored, as usual for "logit weights").

``feature_pages`` writes ``index.html`` (a table of every chosen latent) and
``feature_<i>.html`` per latent into ``out_dir``; the pages are plain HTML with inline SVG
and no scripts, so they open anywhere and need no network.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.sae.arch import SAE, SAEError

_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
          "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
          ".tok{font-family:monospace;padding:0 1px;border-radius:2px}.ex{margin:4px 0;white-space:nowrap}"
          ".pos{color:#060}.neg{color:#900}small{color:#666}")


def _ids(inputs: Any) -> Tensor:
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise SAEError("feature pages need token inputs: tensors of ids [batch, pos] or dicts with input_ids")
    return ids


def collect(model: nn.Module, sae: SAE, site: Site, batches: Iterable[Any],
            row_mask: Callable[[Any], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes [n, pos, d_sae], token ids [n, pos], real-token mask [n, pos])`` over the batches.

    A site without a position dimension (``[batch, d]``) is taken to be at the last position.
    ``row_mask(inputs) -> [batch, pos]`` leaves more positions out (BOS, say) without
    changing what the model sees.
    """
    codes, ids, masks = [], [], []
    with torch.no_grad():
        for inputs in batches:
            tok = _ids(inputs)
            view = cache(model, inputs, [site])[site]
            if view.dim() == 2:  # [batch, d]: place it at the last position
                full = view.new_zeros(tok.shape[0], tok.shape[1], view.shape[-1])
                full[:, -1] = view
                mask = torch.zeros_like(tok, dtype=torch.bool)
                mask[:, -1] = True
                view = full
            else:
                mask = inputs["attention_mask"].bool() if isinstance(inputs, dict) and "attention_mask" in inputs \
                    else torch.ones_like(tok, dtype=torch.bool)
            if row_mask is not None:
                mask = mask & row_mask(inputs).to(mask.device).bool()
            if view.shape[:2] != tok.shape:
                raise SAEError(f"the site's activation {list(view.shape)} does not line up with the tokens {list(tok.shape)}")
            codes.append(sae.encode(view.float()) * mask[..., None])
            ids.append(tok)
            masks.append(mask)
    return torch.cat(codes), torch.cat(ids), torch.cat(masks)


def logit_map(model: nn.Module, sae: SAE) -> Tensor | None:
    """``[d_in, vocab]``: the unembedding, when the dictionary's width is the model's residual width."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "unembed", None)
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == sae.d_out:
        return weight.detach().T.float()
    return None


def _svg_histogram(values: Tensor, bins: int = 30, width: int = 360, height: int = 90) -> str:
    if values.numel() == 0:
        return "<p><small>never active on these inputs</small></p>"
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=float(values.max()) or 1.0)
    top = float(counts.max()) or 1.0
    w = width / bins
    bars = "".join(f'<rect x="{i * w:.1f}" y="{height - height * float(c) / top:.1f}" width="{w - 1:.1f}" '
                   f'height="{height * float(c) / top:.1f}" fill="#4a7"/>' for i, c in enumerate(counts))
    return (f'<svg width="{width}" height="{height + 14}" role="img"><g>{bars}</g>'
            f'<text x="0" y="{height + 12}" font-size="10">0</text>'
            f'<text x="{width - 40}" y="{height + 12}" font-size="10">{float(values.max()):.3g}</text></svg>')


def _example(ids: Tensor, acts: Tensor, pos: int, peak: float, token_str: Callable[[int], str], before: int, after: int) -> str:
    lo, hi = max(0, pos - before), min(ids.numel(), pos + after + 1)
    spans = []
    for j in range(lo, hi):
        a = float(acts[j])
        alpha = min(1.0, a / peak) if peak > 0 and a > 0 else 0.0
        style = f"background:rgba(220,90,30,{alpha:.2f})" + (";outline:1px solid #333" if j == pos else "")
        spans.append(f'<span class="tok" style="{style}" title="{a:.3g}">{html.escape(token_str(int(ids[j])))}</span>')
    return f'<div class="ex">{"".join(spans)} <small>{float(acts[pos]):.3g}</small></div>'


def _tokens(values: Tensor, idx: Tensor, token_str: Callable[[int], str], cls: str) -> str:
    return ", ".join(f'<span class="tok {cls}">{html.escape(token_str(int(i)))}</span> <small>{float(v):+.3g}</small>'
                     for v, i in zip(values, idx))


def feature_pages(model: nn.Module, sae: SAE, site: Site, batches: Iterable[Any], out_dir: str | Path, *,
                  features: Sequence[int] | None = None, n_features: int = 50, n_examples: int = 10,
                  context: tuple[int, int] = (10, 3), to_logits: Tensor | None = None,
                  token_str: Callable[[int], str] = str, title: str = "") -> Path:
    """Write the pages of ``features`` (default: the ``n_features`` most often active); returns index.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = _Seen.of(model, sae, site, batches, to_logits)
    if features is None:
        features = seen.density.argsort(descending=True)[:n_features].tolist()
    seen.check(features)
    rows = []
    for f in map(int, features):
        body, first = seen.body(f, n_examples, context, token_str)
        (out / f"feature_{f}.html").write_text(_page(f"latent {f}", body + '<p><a href="index.html">all latents</a></p>'))
        rows.append(f'<tr><td><a href="feature_{f}.html">{f}</a></td><td>{float(seen.density[f]):.4%}</td>'
                    f"<td>{seen.peak(f):.3g}</td><td>{first}</td></tr>")
    table = "<table><tr><th>latent</th><th>density</th><th>max</th><th>top promoted token</th></tr>" + "".join(rows) + "</table>"
    head = html.escape(title or f"{sae.cfg.arch} dictionary, {sae.d_sae} latents, at {site}")
    index = out / "index.html"
    index.write_text(_page(head, f"<h1>{head}</h1><p>{seen.n_tokens} tokens; dead on these inputs: "
                                 f"{seen.n_dead} of {sae.d_sae}</p>{table}"))
    return index


def feature_sheet(model: nn.Module, sae: SAE, site: Site, batches: Iterable[Any], features: Sequence[int], *,
                  n_examples: int = 8, context: tuple[int, int] = (10, 3), to_logits: Tensor | None = None,
                  token_str: Callable[[int], str] = str, title: str = "",
                  row_mask: Callable[[Any], Tensor] | None = None) -> str:
    """The pages of ``features`` on one self-contained HTML page (for embedding in a report);
    ``row_mask`` as in :func:`collect`."""
    seen = _Seen.of(model, sae, site, batches, to_logits, row_mask)
    seen.check(features)
    head = html.escape(title or f"{sae.cfg.arch} dictionary, {sae.d_sae} latents, at {site}")
    bodies = "".join(f"<section>{seen.body(int(f), n_examples, context, token_str)[0]}</section><hr>"
                     for f in features)
    return _page(head, f"<h1>{head}</h1><p>{seen.n_tokens} tokens; dead on these inputs: {seen.n_dead} of "
                       f"{sae.d_sae}</p>{bodies}")


class _Seen:
    """A dictionary's codes on some inputs and the map of its directions to the logits."""

    def __init__(self, sae: SAE, codes: Tensor, ids: Tensor, mask: Tensor, to_logits: Tensor | None) -> None:
        self.sae, self.ids = sae, ids
        self.flat = codes.reshape(-1, sae.d_sae)  # [n*pos, m]
        self.codes = codes  # [n, pos, m]
        self.n_tokens = int(mask.sum())
        self.density = (self.flat != 0).sum(0).float() / max(self.n_tokens, 1)  # [m]
        self.n_dead = int((self.density == 0).sum())
        if to_logits is not None and to_logits.shape[0] != sae.d_out:
            raise SAEError(f"to_logits must be [d_out={sae.d_out}, vocab], got {list(to_logits.shape)}")
        self.to_logits = to_logits

    @classmethod
    def of(cls, model: nn.Module, sae: SAE, site: Site, batches: Iterable[Any], to_logits: Tensor | None,
           row_mask: Callable[[Any], Tensor] | None = None) -> "_Seen":
        codes, ids, mask = collect(model, sae, site, batches, row_mask)  # [n, pos, m], [n, pos], [n, pos]
        return cls(sae, codes, ids, mask, to_logits if to_logits is not None else logit_map(model, sae))

    def check(self, features: Sequence[int]) -> None:
        bad = [f for f in features if not 0 <= int(f) < self.sae.d_sae]
        if bad:
            raise SAEError(f"features {bad[:5]} are outside the dictionary's {self.sae.d_sae} latents")

    def peak(self, f: int) -> float:
        col = self.flat[:, f]
        return float(col.max()) if col.numel() else 0.0

    def body(self, f: int, n_examples: int, context: tuple[int, int], token_str: Callable[[int], str]) -> tuple[str, str]:
        """(HTML of latent ``f``'s page, its top promoted token)."""
        col, pos = self.flat[:, f], self.ids.shape[1]
        top = col.topk(min(n_examples, int((col > 0).sum()))).indices if (col > 0).any() else col[:0].long()
        peak = self.peak(f)
        examples = "".join(_example(self.ids[int(i) // pos], self.codes[int(i) // pos, :, f], int(i) % pos, peak,
                                    token_str, *context) for i in top)
        promoted = suppressed = ""
        if self.to_logits is not None:  # one latent's row at a time: [m, vocab] at once is GBs for a large vocabulary
            logits = self.sae.W_dec[f].detach().float() @ self.to_logits  # [vocab]
            k = min(10, logits.shape[0])
            up, down = logits.topk(k), (-logits).topk(k)
            promoted = _tokens(up.values, up.indices, token_str, "pos")
            suppressed = _tokens(-down.values, down.indices, token_str, "neg")
        body = (f"<h1>latent {f}</h1><p>density {float(self.density[f]):.4%} of {self.n_tokens} tokens; "
                f"max activation {peak:.4g}</p>"
                f"<h2>activations when active</h2>{_svg_histogram(col[col > 0])}"
                f"<h2>top examples</h2>{examples or '<p><small>none</small></p>'}"
                + (f"<h2>promotes</h2><p>{promoted}</p><h2>suppresses</h2><p>{suppressed}</p>"
                   if self.to_logits is not None else
                   "<p><small>no map to the logits: give to_logits=[d, vocab]</small></p>"))
        return body, promoted.split(", ")[0] if promoted else ""


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")
