"""Planning sharded state: which box of which tensor each rank writes, and which bytes a load reads.

``boxes`` is the geometry (boxes of a tensor, their overlap, whether they
tile it, the bytes of a sub-box in a row-major chunk); ``dtensor`` turns a
``DTensor`` into the boxes of its local shard and chooses which replica
writes them. Nothing here does I/O.
"""
