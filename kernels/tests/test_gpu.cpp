// ctest gpu_kernels: every exported kernel through the C API on the inputs tests/aot/make_inputs.py wrote, against
// the float64 reference: the C output's max error must be within the case's bound (2x the error of
// finevit.kernels on the same inputs), every element written (outputs are poisoned with NaN first).
// Exits 77 (ctest skip) without a driver or a device. Usage: test_gpu INPUT_DIR
#include <finevit_kernels.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_driver.h"

static const int SKIP = 77;
static const finevit_cuda_driver *cu;
static std::string input_dir;

static float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    float value = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -value : value;
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

static float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

static std::vector<char> read_file(const std::string &name) {
  std::ifstream file(input_dir + "/" + name, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + input_dir + "/" + name);
  return std::vector<char>((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
}

static void require(CUresult result, const char *what) {
  if (result != CUDA_SUCCESS) throw std::runtime_error(std::string(what) + " failed: " + std::to_string(result));
}

static void require(finevit_status status, const char *what) {
  if (status != FINEVIT_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + finevit_error_string(status) + ": " +
                             finevit_last_error_message());
}

// A device buffer, freed at scope exit.
struct Buffer {
  CUdeviceptr ptr = 0;
  size_t bytes = 0;
  explicit Buffer(size_t size) : bytes(size) { require(cu->MemAlloc(&ptr, size ? size : 1), "cuMemAlloc"); }
  explicit Buffer(const std::vector<char> &host) : Buffer(host.size()) {
    require(cu->MemcpyHtoD(ptr, host.data(), host.size()), "cuMemcpyHtoD");
  }
  ~Buffer() { cu->MemFree(ptr); }
  void *get() const { return reinterpret_cast<void *>(ptr); }
  std::vector<char> download() const {
    std::vector<char> host(bytes);
    require(cu->MemcpyDtoH(host.data(), ptr, bytes), "cuMemcpyDtoH");
    return host;
  }
};

// Max |out - ref| over the case's output; NaN when an element is not finite (unwritten: poisoned).
static double max_error(const std::vector<char> &out, bool bf16, const std::vector<char> &ref_bytes) {
  size_t count = ref_bytes.size() / sizeof(double);
  const double *ref = reinterpret_cast<const double *>(ref_bytes.data());
  const uint16_t *values = reinterpret_cast<const uint16_t *>(out.data());
  if (out.size() != count * 2) return NAN;
  double worst = 0;
  for (size_t i = 0; i < count; ++i) {
    double value = bf16 ? bf16_to_float(values[i]) : half_to_float(values[i]);
    if (!std::isfinite(value)) return NAN;
    worst = std::fmax(worst, std::fabs(value - ref[i]));
  }
  return worst;
}

static std::vector<float> floats(const std::string &csv) {
  std::vector<float> values;
  std::stringstream stream(csv);
  for (std::string item; std::getline(stream, item, ',');) values.push_back(std::stof(item));
  return values;
}

// Runs one case; returns whether it passed.
static bool run_case(const std::string &op, std::map<std::string, std::string> &a) {
  finevit_dtype dtype = a["dtype"] == "bf16" ? FINEVIT_BFLOAT16 : FINEVIT_FLOAT16;
  Buffer out_buffer(read_file(a["finevit"]).size());
  require(cu->MemsetD8(out_buffer.ptr, 0xff, out_buffer.bytes), "cuMemsetD8");  // NaN in fp16 and bf16
  if (op == "attention") {
    int heads = std::stoi(a["heads"]), dim = std::stoi(a["head_dim"]), seqs = std::stoi(a["seqs"]);
    int64_t tokens = std::stoll(a["tokens"]), hd = int64_t(heads) * dim;
    bool rope = a["rope"] == "1";
    Buffer qkv(read_file(a["qkv"])), cu_seqlens(read_file(a["cu"]));
    Buffer cos(rope ? read_file(a["cos"]) : std::vector<char>()), sin(rope ? read_file(a["sin"]) : std::vector<char>());
    size_t size = finevit_varlen_attention_workspace_size(tokens, heads, dim, seqs, dtype, rope);
    Buffer workspace(size);
    char *base = static_cast<char *>(qkv.get());
    finevit_view q{base, 3 * hd, dim}, k{base + hd * 2, 3 * hd, dim}, v{base + 2 * hd * 2, 3 * hd, dim};
    finevit_view out{out_buffer.get(), hd, dim};
    require(finevit_varlen_attention(q, k, v, out, static_cast<const int32_t *>(cu_seqlens.get()), seqs, tokens, heads,
                                     dim, dtype, 0.0f, rope ? static_cast<const float *>(cos.get()) : nullptr,
                                     rope ? static_cast<const float *>(sin.get()) : nullptr, workspace.get(), size,
                                     nullptr),
            "finevit_varlen_attention");
  } else if (op == "rope") {
    int heads = std::stoi(a["heads"]), dim = std::stoi(a["head_dim"]);
    int64_t tokens = std::stoll(a["tokens"]);
    Buffer x(read_file(a["x"])), cos(read_file(a["cos"])), sin(read_file(a["sin"]));
    finevit_view in{x.get(), int64_t(heads) * dim, dim}, out{out_buffer.get(), int64_t(heads) * dim, dim};
    require(finevit_apply_rope(in, out, static_cast<const float *>(cos.get()), static_cast<const float *>(sin.get()),
                               tokens, heads, dim, dtype, nullptr),
            "finevit_apply_rope");
  } else if (op == "patch_embed") {
    int patch = std::stoi(a["patch"]), width = std::stoi(a["width"]);
    int64_t rows = std::stoll(a["rows"]);
    std::vector<float> mean = floats(a["mean"]), stdev = floats(a["std"]), table(2 * mean.size());
    require(finevit_patch_embed_norm_table(mean.data(), stdev.data(), int(mean.size()), table.data()), "norm table");
    std::vector<char> table_bytes(reinterpret_cast<char *>(table.data()),
                                  reinterpret_cast<char *>(table.data()) + table.size() * sizeof(float));
    Buffer patches(read_file(a["patches"])), weight(read_file(a["weight"])), norm(table_bytes);
    bool has_bias = a.count("bias") > 0;
    Buffer bias(has_bias ? read_file(a["bias"]) : std::vector<char>());
    int features = int(mean.size()) * patch * patch;
    require(finevit_patch_embed(static_cast<const uint8_t *>(patches.get()), features, weight.get(),
                                has_bias ? bias.get() : nullptr, static_cast<const float *>(norm.get()),
                                out_buffer.get(), rows, int(mean.size()), patch, width, dtype, nullptr),
            "finevit_patch_embed");
  } else {
    throw std::runtime_error("unknown op " + op);
  }
  require(cu->CtxSynchronize(), "cuCtxSynchronize (the kernels ran)");
  std::vector<char> result = out_buffer.download(), ref = read_file(a["ref"]);
  bool bf16 = dtype == FINEVIT_BFLOAT16;
  double error = max_error(result, bf16, ref), python_error = max_error(read_file(a["finevit"]), bf16, ref);
  double bound = std::stod(a["bound"]);
  bool passed = error <= bound;  // false for NaN
  std::printf("%s %s: max error %.3g vs float64 (finevit.kernels %.3g, bound %.3g)\n", passed ? "ok    " : "FAILED",
              a["name"].c_str(), error, python_error, bound);
  return passed;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s INPUT_DIR (written by tests/aot/make_inputs.py)\n", argv[0]);
    return 2;
  }
  input_dir = argv[1];
  const char *why = "";
  cu = finevit_cuda(&why);
  int devices = 0;
  if (cu == nullptr || cu->DeviceGetCount(&devices) != CUDA_SUCCESS || devices == 0) {
    std::printf("no CUDA driver or device (%s): skipped\n", cu == nullptr ? why : "no device");
    return SKIP;
  }
  try {
    CUdevice device;
    CUcontext context;
    require(cu->DeviceGet(&device, 0), "cuDeviceGet");
    require(cu->DevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
    require(cu->CtxSetCurrent(context), "cuCtxSetCurrent");
    std::ifstream cases(input_dir + "/cases.txt");
    if (!cases) throw std::runtime_error("no " + input_dir + "/cases.txt: run tests/aot/make_inputs.py first");
    int failed = 0, total = 0;
    for (std::string line; std::getline(cases, line);) {
      if (line.empty()) continue;
      std::stringstream words(line);
      std::string op, word;
      words >> op;
      std::map<std::string, std::string> arguments;
      while (words >> word) {
        size_t equals = word.find('=');
        arguments[word.substr(0, equals)] = word.substr(equals + 1);
      }
      ++total;
      if (!run_case(op, arguments)) ++failed;
    }
    std::printf("%d of %d cases passed\n", total - failed, total);
    return failed == 0 && total > 0 ? 0 : 1;
  } catch (const std::exception &error) {
    std::printf("FAILED: %s\n", error.what());
    return 1;
  }
}
