"""Key material and the primitives under every signature: key files and JWKs
(``keys``), SM2 with SM3 (``sm2``), keys in a PKCS#11 token (``hsm``), and files that
hold secrets (``files``). Imports only the floor (``gateway.errors``, ``gateway.encoding``).
"""
