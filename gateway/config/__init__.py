"""What this gateway is told to be: ``config.yaml`` parsed and frozen (``model``), what
is secret in it (``secrets``), secrets by reference and sealed at rest (``secretstore``),
where outbound requests may go (``outbound``), and the adapter types installed
(``plugins``). Imports the floor, ``gateway.crypto``, ``gateway.signing`` and
``adapters.base``; never the store, the runtime or the exchange.
"""
