"""Evaluation as a user runs it (``whymatch eval``) and as training validates.

Duplicate groups: every image with a partner queries the folder (plus any distractor galleries),
never retrieving itself. Retrieval is reported twice — by embedding alone, and as search does it:
the top ``rerank_k`` candidates re-scored by the full Siamese head. Pair ROC-AUC covers *all* pairs
of images in the folder (same group positive, every other pair negative), for the head and for the
plain embedding similarity, so the report shows whether the head earns its keep.
Class folders: pair ROC-AUC and accuracy at the model's threshold on the paper's balanced pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from engine.data import paper_pairs
from engine.eval.metrics import all_pairs, pair_metrics, retrieval_metrics
from engine.nn.siamese import SiameseNet, signatures

RERANK_K = 20


def embedding_similarities(net: SiameseNet, emb_q: Tensor, emb_g: Tensor) -> Tensor:
    """Similarity the index ranks by: inner product of unit vectors, or minus the paper's distance."""
    if net.config.metric == "l2":
        return -torch.cdist(emb_q, emb_g)
    return emb_q @ emb_g.T


def pair_scores(net: SiameseNet, fmaps_a: Tensor, fmaps_b: Tensor, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Head similarity of pairs (fmaps_a[i], fmaps_b[j]); each image is described once."""
    sig_a = signatures(net, fmaps_a)
    sig_b = sig_a if fmaps_b is fmaps_a else signatures(net, fmaps_b)
    with torch.inference_mode():
        return net.score_pairs(sig_a, i, sig_b, j).cpu().numpy().astype(np.float32)


def evaluate_fmaps(
    net: SiameseNet,
    fmaps: Tensor,
    groups: list[str | None],
    form: str,
    threshold: float | None,
    *,
    gallery_fmaps: Tensor | None = None,
    rerank_k: int = RERANK_K,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of a network on precomputed feature maps (see the module docstring)."""
    net.eval()
    if form != "groups":
        i, j, labels = paper_pairs(groups, seed)
        return pair_metrics(pair_scores(net, fmaps, fmaps, i, j), labels, threshold)
    n = len(groups)
    all_fmaps = fmaps if gallery_fmaps is None else torch.cat([fmaps, gallery_fmaps])
    gallery_groups = list(groups) + [None] * (len(all_fmaps) - n)
    ids = list(range(len(all_fmaps)))
    with torch.inference_mode():
        emb = net.embed_fmap(all_fmaps.float())
        sims = embedding_similarities(net, emb[:n], emb).cpu().numpy()
        emb = emb.cpu()
    plain = retrieval_metrics(emb[:n].numpy(), groups, emb.numpy(), gallery_groups, query_ids=ids[:n], gallery_ids=ids, scores=sims)
    reranked_sims = _rerank(net, fmaps, all_fmaps, sims, rerank_k)
    result = retrieval_metrics(emb[:n].numpy(), groups, emb.numpy(), gallery_groups, query_ids=ids[:n], gallery_ids=ids, scores=reranked_sims)
    i, j, labels = all_pairs(groups)
    result.update(pair_metrics(pair_scores(net, fmaps, fmaps, i, j), labels, threshold))
    result.update({f"embedding_{k}": v for k, v in plain.items() if k != "n_queries"})
    result["embedding_pair_auc"] = pair_metrics(sims[i, j], labels)["pair_auc"]
    return result


def _rerank(net: SiameseNet, query_fmaps: Tensor, gallery_fmaps: Tensor, sims: np.ndarray, k: int) -> np.ndarray:
    """Ranking scores after the head re-scores each query's top-k (self excluded): those go first."""
    n = len(query_fmaps)
    candidates = sims.copy()
    candidates[np.arange(n), np.arange(n)] = -np.inf
    k = min(k, sims.shape[1] - 1)
    top = np.argsort(-candidates, axis=1)[:, :k]
    sims = sims.copy()
    rows = np.repeat(np.arange(n), k)
    head = pair_scores(net, query_fmaps, gallery_fmaps, rows, top.ravel())
    offset = np.abs(sims).max() + 2.0
    sims[rows, top.ravel()] = offset + head
    return sims
