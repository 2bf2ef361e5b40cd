"""The batching runtime: paged KV cache, block manager, scheduler, sampler, detokenizer, engine.

One module per job; `engine.Engine` ties them together and `autodeploy.llm.LLM` is the user API.
"""
