"""The vLLM KV connector of sir-vllm (scheduler role + worker role).

vLLM loads `SirKVConnector` from here through `kv_connector_module_path`. It is
imported lazily so `sir_vllm.connector.protocol` stays free of vLLM imports.
"""

__all__ = ["SirKVConnector"]


def __getattr__(name):
    if name == "SirKVConnector":
        from sir_vllm.connector.connector import SirKVConnector
        return SirKVConnector
    raise AttributeError(name)
