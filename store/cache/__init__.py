"""The shared remote cache: protocol, signatures, push, substitution and the server.

Normative description: ``spec/cache.md``. One module per concept:

``url``        cache URLs (``file://``, ``http(s)://``, ``s3://``) and the backend registry
``backend``    the object-store interface every backend implements (get/put/missing)
``keys``       Ed25519 keys in Nix's ``name:base64`` form, fingerprints, signing
``layout``     object keys, ``fimio-cache.json``, info and realisation records
``manifest``   the per-path tree object: directories plus where each blob lives
``packing``    FastCDC chunks of large files, content-defined packs of small files, zstd
``push``       upload closures (only what the cache lacks)
``substitute`` :class:`SubstituterSet`: verified download into the local store
``ingest``     writing fetched blobs and registering fetched paths atomically
``server``     ``fimio serve`` (aiohttp)
``challenge``  compare what caches claim for the same derivation outputs

Nothing here imports click; heavy libraries (obstore, aiohttp, cryptography) are imported
by the modules that need them, so importing :mod:`fimio.store` stays cheap.
"""
