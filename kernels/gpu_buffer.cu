#include "kernels/cuda_common.cuh"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"

namespace qopt {

bool gpu_available() { return query_cuda_device().usable; }

template <typename T>
void DeviceBuffer<T>::resize(size_t count) {
    release();
    if (count == 0) return;
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), count * sizeof(T)));
    count_ = count;
}

template <typename T>
void DeviceBuffer<T>::release() {
    if (data_) cudaFree(data_);
    data_ = nullptr;
    count_ = 0;
}

template <typename T>
void DeviceBuffer<T>::upload(const std::vector<T>& host) {
    if (host.size() != count_) resize(host.size());
    CUDA_CHECK(cudaMemcpy(data_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
std::vector<T> DeviceBuffer<T>::download() const {
    std::vector<T> host(count_);
    CUDA_CHECK(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
}

template <typename T>
std::vector<T> DeviceBuffer<T>::download_prefix(size_t count) const {
    QOPT_CHECK(count <= count_, "download_prefix: ", count, " values from a buffer of ", count_);
    std::vector<T> host(count);
    CUDA_CHECK(cudaMemcpy(host.data(), data_, count * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
}

template <typename T>
void DeviceBuffer<T>::upload_prefix(const std::vector<T>& host) {
    QOPT_CHECK(host.size() <= count_, "upload_prefix: ", host.size(), " values into a buffer of ", count_);
    CUDA_CHECK(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
void DeviceBuffer<T>::fill_bytes(unsigned char byte) {
    CUDA_CHECK(cudaMemset(data_, byte, count_ * sizeof(T)));
}

template class DeviceBuffer<float>;
template class DeviceBuffer<bf16>;
template class DeviceBuffer<int>;
template class DeviceBuffer<int64_t>;
template class DeviceBuffer<double>;
template class DeviceBuffer<uint8_t>;
template class DeviceBuffer<uint32_t>;
template class DeviceBuffer<int8_t>;

}  // namespace qopt
