"""An exported model at work: the export folder's format (`export_format`), the item index, the
recommender, the HTTP app (`app`) with its body limit and hot reload. Needs only the plain install
(torch, transformers, FAISS, FastAPI): neither Lightning, DeepSpeed, W&B nor pandas."""
