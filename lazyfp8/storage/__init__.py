"""The on-disk layer: a path becomes files, an index and shard headers, and bytes.

``files`` opens regular files only and pins their identity; ``header`` parses and checks one
safetensors header; ``checkpoint`` finds the shards of a checkpoint the way transformers does;
``reader`` reads byte ranges from them; ``dtypes`` is the one table of dtype facts; and
``destination`` is the writers' side, the atomic commit of a checkpoint directory. Nothing here
knows about quantization.
"""
