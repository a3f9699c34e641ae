-- wrk script: GET one path per request. BENCH_PATH is a path, where "%05d" (if present)
-- is filled with a random number in 1..BENCH_SKUS; BENCH_TOKEN is the bearer key.
local threads = {}
local path = os.getenv("BENCH_PATH")
local skus = tonumber(os.getenv("BENCH_SKUS") or "0")
local token = os.getenv("BENCH_TOKEN")

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  if skus > 0 then
    return wrk.format("GET", string.format(path, math.random(1, skus)))
  end
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,' ..
    '"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
