"""Replicas on Ray Serve (`serve --replicas N`, `serve run autoglm_trt.serve.ray_app:app`).

affinity.py is pure Python (the session key, the replica ranking); the other modules import Ray, which is an
optional extra (`pip install 'autoglm-trt[ray]'`): nothing outside this package and ray_app.py imports them.
"""
