"""The engine: sequences, KV block manager, scheduler, model runner, sampler, and the loop that ties them."""
