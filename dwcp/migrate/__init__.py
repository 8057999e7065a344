"""Image migration between nodes: a sans-IO protocol (``protocol``, ``messages``)
and the asyncio glue that binds it to a transport session and the delta engine.
"""
