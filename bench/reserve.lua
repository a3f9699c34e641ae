-- wrk script: POST one-unit orders, each with its own Idempotency-Key.
-- BENCH_SKU names one hot SKU; or BENCH_SKUS=N spreads orders over S00001..SN at random.
-- BENCH_TOKEN is the bearer key.
local threads = {}
local sku = os.getenv("BENCH_SKU")
local skus = tonumber(os.getenv("BENCH_SKUS") or "0")
local token = os.getenv("BENCH_TOKEN")

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  math.randomseed(os.time() * 1000 + tid)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  counter = counter + 1
  local key = string.format("b-%d-%d-%d", tid, counter, math.random(1, 2000000000))
  wrk.headers["Idempotency-Key"] = key
  local line_sku = sku
  if skus > 0 then
    line_sku = string.format("S%05d", math.random(1, skus))
  end
  local body = string.format(
    '{"order_id":"%s","lines":[{"sku":"%s","quantity":1}]}', key, line_sku)
  return wrk.format(nil, "/v1/reservations", nil, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,' ..
    '"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
