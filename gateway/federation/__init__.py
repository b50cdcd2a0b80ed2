"""The federation directory: the national platform's signed document of gateways
and services (``directory``), and following it and announcing ourselves in it
(``follower``). Imports up to ``gateway.runtime`` and ``gateway.observe``; never the
exchange.
"""
