"""The optional Ray backend: metrank's embedding, indexing, evaluation and training past one machine.

- :func:`metrank.scale.embed.embed`: Ray Data batch embedding (one model per actor, ``num_gpus=1`` per actor on GPU
  clusters) into resumable Parquet shards of (id, embedding, source);
- :func:`metrank.scale.index.build_index`: train the IVF quantiser once on a sample, add shards in parallel Ray
  tasks (FAISS indexes travel as ``faiss.serialize_index`` bytes), merge, write atomically with a completion marker;
- :func:`metrank.scale.evaluate.retrieval_metrics`: gallery shards held by actors, queries broadcast, rank counts
  summed (``metrank.metrics.shard_rank_counts``) -- the same numbers as the single-process metrics;
  :func:`metrank.scale.evaluate.image_text_metrics` likewise for i2t/t2i (caption shards for i2t, image shards for t2i);
- :func:`metrank.scale.train.train`: Ray Train's ``TorchTrainer`` running metrank's own DDP trainer unchanged.

Install with ``pip install 'metrank[ray]'``. Only this package imports ``ray``, and only when one of its functions
runs (:func:`metrank.scale.cluster.require_ray`).
"""
