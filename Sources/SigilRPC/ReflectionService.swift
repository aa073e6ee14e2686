public import GRPCCore
import GRPCProtobuf
import SwiftProtobuf
import Foundation

/// gRPC Server Reflection for the Workload API socket (SPIFFE Workload Endpoint, section 7: "SHOULD
/// include support for gRPC Server Reflection"), under both names tools use:
/// `grpc.reflection.v1.ServerReflection` and `grpc.reflection.v1alpha.ServerReflection` (same
/// messages). It answers `list_services`, `file_by_filename` and `file_containing_symbol` from the
/// descriptors of workload.proto compiled in (``workloadAPIFileDescriptorSetBase64``); extensions
/// do not exist here (NOT_FOUND). It tells nothing a caller could not read in SPIFFE's published
/// workload.proto, so it needs no attestation.
public struct WorkloadAPIReflectionService: ReflectionServerReflection.SimpleServiceProtocol {
    /// Serialized FileDescriptorProtos by file name, and the file defining each fully qualified symbol.
    let files: [String: (bytes: Data, dependencies: [String])]
    let symbols: [String: String]
    let services: [String]
    /// Runs a reflection stream's loop: the Workload API server ends it on shutdown, as it ends
    /// its own streams (a client such as grpcui keeps one open for its whole life, and a graceful
    /// shutdown waits for every open RPC).
    let whileServing: @Sendable (@escaping @Sendable () async throws -> Void) async throws -> Void

    public init(whileServing: @escaping @Sendable (@escaping @Sendable () async throws -> Void) async throws -> Void = { try await $0() }) {
        self.whileServing = whileServing
        var files: [String: (Data, [String])] = [:]
        var symbols: [String: String] = [:]
        var services: [String] = []
        let set = Data(base64Encoded: workloadAPIFileDescriptorSetBase64)
            .flatMap { try? Google_Protobuf_FileDescriptorSet(serializedBytes: $0) } ?? Google_Protobuf_FileDescriptorSet()
        for file in set.file {
            guard let bytes: Data = try? file.serializedBytes() else { continue }
            files[file.name] = (bytes, file.dependency)
            let prefix = file.package.isEmpty ? "" : file.package + "."
            func addMessages(_ messages: [Google_Protobuf_DescriptorProto], scope: String) {
                for message in messages {
                    let name = scope + message.name
                    symbols[name] = file.name
                    for field in message.field { symbols[name + "." + field.name] = file.name }
                    for e in message.enumType { symbols[name + "." + e.name] = file.name }
                    addMessages(message.nestedType, scope: name + ".")
                }
            }
            addMessages(file.messageType, scope: prefix)
            for e in file.enumType { symbols[prefix + e.name] = file.name }
            for service in file.service {
                symbols[prefix + service.name] = file.name
                for method in service.method { symbols[prefix + service.name + "." + method.name] = file.name }
                if file.name == "workload.proto" { services.append(prefix + service.name) }
            }
        }
        self.files = files
        self.symbols = symbols
        self.services = services + Self.names
    }

    static let names = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]

    public func serverReflectionInfo(
        request: RPCAsyncSequence<ReflectionServerReflectionRequest, any Error>,
        response: RPCWriter<ReflectionServerReflectionResponse>,
        context: ServerContext
    ) async throws {
        try await whileServing {
            for try await message in request {
                try await response.write(answer(message))
            }
        }
    }

    func answer(_ request: ReflectionServerReflectionRequest) -> ReflectionServerReflectionResponse {
        var out = ReflectionServerReflectionResponse()
        out.validHost = request.host
        out.originalRequest = request
        func notFound(_ what: String) {
            var error = ReflectionErrorResponse()
            error.errorCode = Int32(RPCError.Code.notFound.rawValue)
            error.errorMessage = what
            out.errorResponse = error
        }
        switch request.messageRequest {
        case .listServices:
            var list = ReflectionListServiceResponse()
            list.service = services.map { var s = ReflectionServiceResponse(); s.name = $0; return s }
            out.listServicesResponse = list
        case .fileByFilename(let name):
            if let found = fileWithDependencies(name) { out.fileDescriptorResponse = found } else { notFound("no file \(name)") }
        case .fileContainingSymbol(let symbol):
            let name = symbols[symbol] ?? symbols[String(symbol.drop { $0 == "." })]
            if let name, let found = fileWithDependencies(name) { out.fileDescriptorResponse = found } else { notFound("no symbol \(symbol)") }
        case .fileContainingExtension(let request):
            notFound("no extension \(request.extensionNumber) of \(request.containingType)")
        case .allExtensionNumbersOfType(let type):
            notFound("no extensions of \(type)")
        case nil:
            var error = ReflectionErrorResponse()
            error.errorCode = Int32(RPCError.Code.invalidArgument.rawValue)
            error.errorMessage = "the request names nothing to reflect on"
            out.errorResponse = error
        }
        return out
    }

    /// The file and, after it, every file it imports (transitively), once each.
    func fileWithDependencies(_ name: String) -> ReflectionFileDescriptorResponse? {
        guard files[name] != nil else { return nil }
        var order: [String] = []
        var pending = [name]
        while let next = pending.first {
            pending.removeFirst()
            guard !order.contains(next), let file = files[next] else { continue }
            order.append(next)
            pending += file.dependencies
        }
        var out = ReflectionFileDescriptorResponse()
        out.fileDescriptorProto = order.compactMap { files[$0]?.bytes }
        return out
    }

    /// Registers the method under both service names.
    public func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        for service in Self.names {
            router.registerHandler(
                forMethod: MethodDescriptor(fullyQualifiedService: service, method: "ServerReflectionInfo"),
                deserializer: ProtobufDeserializer<ReflectionServerReflectionRequest>(),
                serializer: ProtobufSerializer<ReflectionServerReflectionResponse>(),
                handler: { request, context in
                    try await self.serverReflectionInfo(request: request, context: context)
                })
        }
    }
}
